# frozen_string_literal: true

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "hyperion"
require "json"
require "net/http"
require "socket"
require "timeout"
require "tmpdir"
require "fileutils"

# In-process workers log through tracing to fd 2; keep the spec output
# readable. Specs that assert on log lines run bin/hyperion in a child.
ENV["HYPERION_LOG"] ||= "off"

# The compaction pass (HYPERION_GC_COMPACT=1) must keep every heap page.
# Ruby 3.1's compaction ends by reading each thread's VM stack one slot past
# its top (rb_vm_each_stack_value, fixed upstream in ruby/ruby#7081); that
# slot holds a stale reference, and if its heap page was freed (unmapped)
# since, Ruby segfaults (spec/ruby_compaction_bug_spec.rb shows it in plain
# Ruby). With RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO=1.0 no page is ever freed,
# so the stray read lands in a live page and does no harm. Ruby reads the
# variable at boot, so it is checked here, not set.
compaction_pass = ENV["HYPERION_GC_STRESS"] == "1" && ENV["HYPERION_GC_COMPACT"] == "1"
if compaction_pass && ENV["RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO"] != "1.0"
  abort "The compaction pass needs RUBY_GC_HEAP_FREE_SLOTS_MAX_RATIO=1.0 in the environment (see spec/spec_helper.rb)"
end
Dir[File.join(__dir__, "support/*.rb")].sort.each { |f| require f }

RSpec.configure do |config|
  config.include ServerHelpers
  config.include LoadHelpers
  config.include ProcessHelpers
  config.disable_monkey_patching!
  config.order = :random
  # `rake gc_stress` runs the examples tagged :gc_stress with GC.stress on
  # around each request (see ServerHelpers#gc_stress).
  config.filter_run_excluding(:gem_install) unless ENV["HYPERION_GEM_INSTALL"] == "1" || ENV["CI"]
  # Under GC.stress every allocation collects: a loaded machine can take
  # several times longer, and a limit is there to end a hang, not to time.
  stress_factor = ENV["HYPERION_GC_STRESS"] == "1" ? 4 : 1
  # RSpec loads its matchers on first use, and loading code under GC.stress
  # takes minutes: load them all before any example stresses.
  if stress_factor > 1
    config.before(:suite) do
      RSpec::Matchers::BuiltIn.constants.each { |name| RSpec::Matchers::BuiltIn.const_get(name) }
    end
  end
  if compaction_pass
    config.after(:suite) do
      freed = GC.stat(:total_freed_pages)
      raise "the compaction pass freed #{freed} heap pages; it relies on freeing none" if freed.positive?
    end
  end
  config.around(:each) do |example|
    Timeout.timeout((example.metadata[:timeout] || 60) * stress_factor) { example.run }
  end
end
