# frozen_string_literal: true

require "spec_helper"

# The compaction pass (`rake gc_compact`) crashed inside Ruby now and then.
# The cause is Ruby 3.1's own: compaction ends by reading one slot past the
# top of every thread's VM stack (ruby/ruby#7081) and segfaults when that
# stale slot points into a heap page freed since. These run the plain-Ruby
# reproducer (spec/fixtures/stale_stack_slot.rb) in a child Ruby: the
# workaround the pass uses must keep it alive, and on Ruby 3.1 it must crash
# without it (otherwise the reproducer shows nothing).
RSpec.describe "Ruby's compaction and a stale slot above a thread's VM stack" do
  let(:script) { File.join(ServerHelpers::FIXTURES, "stale_stack_slot.rb") }

  def run_reproducer(free_slots_max_ratio)
    # nil unsets the variable (the compaction pass itself sets it); no core
    # file from the expected crash.
    Open3.capture2e({ "RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO" => free_slots_max_ratio }, RbConfig.ruby, script,
                    rlimit_core: 0)
  end

  it "survives when no heap page is ever freed (RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO=1.0)" do
    out, status = run_reproducer("1.0")
    expect(status).to be_success, out[0, 2000]
    expect(out).to include("survived the compaction, 0 heap pages freed")
  end

  it "segfaults Ruby 3.1 when the page is freed", if: RUBY_VERSION.start_with?("3.1.") do
    out, status = run_reproducer(nil)
    expect(status).not_to be_success
    expect(out).to include("[BUG] Segmentation fault")
  end
end
