# frozen_string_literal: true

require "spec_helper"

RSpec.describe "rackup -s hyperion" do
  it "serves a rackup through Rack::Handler and stops on SIGINT" do
    dir = Dir.mktmpdir("hyperion-rackup")
    File.write(File.join(dir, "config.ru"), "run ->(env) { [200, {}, ['via rackup ' + env['rack.multithread'].to_s]] }\n")
    log = File.join(dir, "server.log")
    env = { "RUBYLIB" => File.join(ServerHelpers::ROOT, "lib"), "HYPERION_LOG" => "info" }
    pid = Process.spawn(env, "rackup", "-s", "hyperion", "-o", "127.0.0.1", "-p", "0", "-O", "Threads=2:3",
                        "config.ru", chdir: dir, %i[out err] => [log, "w"])
    port = nil
    Timeout.timeout(20) do
      sleep 0.05 until (port = File.read(log)[%r{worker listening .*url=http://127\.0\.0\.1:(\d+)}, 1])
    end
    expect(http_get(port.to_i).body).to eq("via rackup true")
    Process.kill("INT", pid)
    _, status = Timeout.timeout(10) { Process.wait2(pid) }
    expect(status.success?).to be(true), File.read(log)
  ensure
    begin
      Process.kill("KILL", pid) if pid && !status
    rescue Errno::ESRCH
      nil
    end
  end
end
