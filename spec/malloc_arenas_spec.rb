# frozen_string_literal: true

require "spec_helper"

# glibc gives each new thread its own malloc arena and keeps an arena's freed
# memory; Hyperion limits the process to one arena when the server starts
# (src/malloc_arenas.rs), unless the environment chose a count.
RSpec.describe "glibc malloc arenas", if: RUBY_PLATFORM.include?("linux") do
  let(:app) { File.join(ServerHelpers::FIXTURES, "malloc_arenas.ru") }
  # Whatever the environment running the specs says.
  let(:unset) { { "MALLOC_ARENA_MAX" => nil, "GLIBC_TUNABLES" => nil } }

  # Arena counts reported by 20 requests, 10 at a time, so that several app
  # threads, the I/O thread and the dispatcher have all allocated.
  def arena_counts(port)
    2.times.flat_map do
      10.times.map { Thread.new { http_get(port) } }.map(&:value).map do |response|
        expect(response.code).to eq("200")
        Integer(response.body)
      end
    end
  end

  [["a single process", %w[-w 1]], ["cluster workers", %w[-w 2]]].each do |name, workers|
    it "#{name} run on one arena" do
      with_cli(*workers, "-t", "5", app, env: unset) do |port|
        expect(arena_counts(port).uniq).to eq([1])
      end
    end
  end

  it "leaves the count to MALLOC_ARENA_MAX when it is set" do
    with_cli("-t", "5", app, env: unset.merge("MALLOC_ARENA_MAX" => "8")) do |port|
      # The main thread, the I/O thread and an app thread at least.
      expect(arena_counts(port).max).to be >= 3
    end
  end
end
