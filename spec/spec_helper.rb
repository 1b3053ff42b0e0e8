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
  config.around(:each) do |example|
    Timeout.timeout((example.metadata[:timeout] || 60) * stress_factor) { example.run }
  end
end
