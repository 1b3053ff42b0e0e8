# frozen_string_literal: true

require "json"
require "open3"

# Runs spec/support/h2_probe.py (python h2 speaking raw HTTP/2 frames) and
# returns what it saw as a Hash. Needs `pip install h2`; without it the
# example fails saying so.
module H2Probe
  SCRIPT = File.join(__dir__, "h2_probe.py")

  def h2_probe(scenario, port, *args)
    out, err, status = Open3.capture3("python3", SCRIPT, scenario.to_s, port.to_s, *args.map(&:to_s))
    raise "python h2 is missing: pip install h2\n#{err}" if err.match?(/No module named '(hpack|hyperframe)'/)
    raise "h2_probe #{scenario} failed (#{status}):\n#{err}" unless status.success?

    JSON.parse(out.lines.last)
  end
end
