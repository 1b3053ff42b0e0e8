# frozen_string_literal: true

require "spec_helper"

# bin/hyperion behind Debian's real nginx and HAProxy (spec/support/proxies.rb).
# Clients connect from 127.0.0.2 and the proxies from 127.0.0.9, so a
# REMOTE_ADDR of 127.0.0.2 can only have come through the proxy's header.
RSpec.describe "behind nginx and HAProxy", timeout: 120 do
  include Proxies

  let(:client) { "127.0.0.2" }
  let(:proxy) { "127.0.0.9" }

  let(:dir) do
    Dir.mktmpdir("hyperion-proxied").tap do |d|
      FileUtils.mkdir_p(File.join(d, "config"))
      File.write(File.join(d, "config.ru"), <<~RUBY)
        run ->(env) { [200, {}, [env.values_at("REMOTE_ADDR", "SERVER_PROTOCOL", "rack.url_scheme").join(" ")]] }
      RUBY
    end
  end

  def config_file(text) = File.write(File.join(dir, "config/hyperion.rb"), text)

  # GET through `port` from `client`; a new connection unless `http` is given.
  def get_from_client(port, http = nil)
    return http.get("/").body if http

    Net::HTTP.new("127.0.0.1", port).tap { |h| h.local_host = client }.start { |h| h.get("/").body }
  end

  describe "nginx" do
    # spec/support/ws_client.py (Python `websockets`); its JSON result.
    def ws_client(*args)
      out, err, status = Open3.capture3("python3", File.join(__dir__, "support/ws_client.py"), *args.map(&:to_s))
      expect(status).to be_success, "ws_client #{args.join(' ')} failed:\n#{err}"
      JSON.parse(out)
    end

    it "as a reverse proxy with a keep-alive upstream: REMOTE_ADDR from X-Real-IP, one upstream connection" do
      config_file(%(set_remote_address header: "X-Real-IP"\n))
      with_cli(chdir: dir) do |port|
        front = free_port
        with_nginx(http: <<~NGINX) do
          upstream hyperion {
            server 127.0.0.1:#{port};
            keepalive 4;
          }
          server {
            listen 127.0.0.1:#{front};
            location / {
              proxy_pass http://hyperion;
              proxy_http_version 1.1;
              proxy_set_header Connection "";
              proxy_set_header X-Real-IP $remote_addr;
              proxy_bind #{proxy};
            }
          }
        NGINX
          upstream_ports = []
          bodies = Array.new(20) do
            body = get_from_client(front)
            upstream_ports << connections_from(proxy, port)
            body
          end
          expect(bodies.uniq).to eq(["#{client} HTTP/1.1 http"])
          # After every request nginx still held the same upstream connection.
          expect(upstream_ports.uniq.size).to eq(1), upstream_ports.inspect
          expect(upstream_ports.first.size).to eq(1), upstream_ports.inspect
        end
      end
    end

    it "as a TCP proxy with proxy_protocol on: REMOTE_ADDR from the PROXY header, plain and TLS passed through" do
      config_file("set_remote_address proxy_protocol: :v1\n")
      # curl offers h2 over ALPN.
      [[[], "http", "HTTP/1.1"], [["--tls-self-signed"], "https", "HTTP/2"]].each do |flags, scheme, protocol|
        with_cli(*flags, chdir: dir) do |port|
          front = free_port
          with_nginx(stream: <<~NGINX) do
            server {
              listen 127.0.0.1:#{front};
              proxy_pass 127.0.0.1:#{port};
              proxy_protocol on;
              proxy_bind #{proxy};
            }
          NGINX
            out, status = Open3.capture2("curl", "-sSk", "--interface", client, "#{scheme}://127.0.0.1:#{front}/",
                                         "#{scheme}://127.0.0.1:#{front}/")
            expect(status).to be_success
            expect(out).to eq("#{client} #{protocol} #{scheme}" * 2)
            # Straight to Hyperion, without the header: refused.
            _, status = Open3.capture2e("curl", "-sSk", "#{scheme}://127.0.0.1:#{port}/")
            expect(status).not_to be_success
          end
        end
      end
    end
    # nginx's standard WebSocket proxying (docs/deployment.md shows the same
    # lines): HTTP/1.1 upstream, the client's Upgrade passed on, Connection
    # "upgrade" for upgrades and "close" otherwise.
    it "passes WebSockets through as an HTTP reverse proxy (faye-websocket echo, ws://, close 1000)" do
      with_cli("-t", "2", File.join(ServerHelpers::FIXTURES, "faye_echo.ru")) do |port|
        front = free_port
        with_nginx(http: <<~NGINX) do
          map $http_upgrade $connection_upgrade {
            default upgrade;
            ''      close;
          }
          server {
            listen 127.0.0.1:#{front};
            location / {
              proxy_pass http://127.0.0.1:#{port};
              proxy_http_version 1.1;
              proxy_set_header Upgrade $http_upgrade;
              proxy_set_header Connection $connection_upgrade;
              proxy_set_header Host $host;
              proxy_read_timeout 1h;
            }
          }
        NGINX
          result = ws_client("echo", "ws://127.0.0.1:#{front}/", 50)
          expect(result).to eq("text" => 50, "binary" => 50, "close_code" => 1000)
          # Plain HTTP through the same location still works (Connection: close upstream).
          expect(Net::HTTP.get_response(URI("http://127.0.0.1:#{front}/hello")).body).to eq("hello")
        end
      end
    end
  end

  describe "HAProxy" do
    def haproxy_in_front(port, server_options, mode: "http")
      front = free_port
      with_haproxy(<<~HAPROXY) { |haproxy_dir| yield front, haproxy_dir }
        frontend web
          mode #{mode}
          bind 127.0.0.1:#{front}
          default_backend hyperion
        backend hyperion
          mode #{mode}
          server app 127.0.0.1:#{port} #{server_options} source #{proxy}
      HAPROXY
    end

    [%w[v1 send-proxy], %w[v2 send-proxy-v2]].each do |version, option|
      it "with #{option}: REMOTE_ADDR from the PROXY header, new and keep-alive client connections; " \
         "its health checks send the header too" do
        with_cli("--proxy-protocol", version, chdir: dir, env: { "HYPERION_LOG" => "debug" }) do |port, _pid, log|
          haproxy_in_front(port, "#{option} check inter 100ms") do |front, haproxy_dir|
            expect(Array.new(3) { get_from_client(front) }.uniq).to eq(["#{client} HTTP/1.1 http"])
            Net::HTTP.new("127.0.0.1", front).tap { |h| h.local_host = client }.start do |http|
              expect(Array.new(3) { get_from_client(front, http) }.uniq).to eq(["#{client} HTTP/1.1 http"])
            end
            # A check connects, sends its header and leaves: never refused.
            wait_until { haproxy_stats(haproxy_dir, "hyperion", "app")["check_status"] == "L4OK" }
            sleep 0.5 # a few more checks
            expect(File.read(log)).not_to include("connection refused")
          end
        end
      end
    end

    it "with send-proxy-v2 to HTTP/2 (proto h2) and to TLS passed through in TCP mode" do
      with_cli("--proxy-protocol", "v2", chdir: dir) do |port|
        haproxy_in_front(port, "send-proxy-v2 proto h2") do |front|
          expect(get_from_client(front)).to eq("#{client} HTTP/2 http")
        end
      end
      with_cli("--proxy-protocol", "v2", "--tls-self-signed", chdir: dir) do |port|
        haproxy_in_front(port, "send-proxy-v2", mode: "tcp") do |front|
          out, = Open3.capture2("curl", "-sSk", "--http2", "--interface", client, "https://127.0.0.1:#{front}/")
          expect(out).to eq("#{client} HTTP/2 https")
        end
      end
    end

    # drain_delay as a load balancer sees it: HAProxy checks the control
    # listener's /ready every 200 ms and takes "app" out at the first 503;
    # "spare" (another bin/hyperion, unchecked, so it stays UP) takes the
    # traffic. docs/deployment.md shows the same backend.
    [[], %w[-w 2]].each do |process_args|
      it "takes #{process_args.empty? ? 'a single process' : 'a cluster'} out of rotation on TERM with " \
         "drain_delay and /ready health checks: DOWN while still serving, no failed request, exit 0", timeout: 300 do
        File.write(File.join(dir, "name.ru"), %(run ->(env) { [200, {}, [ENV.fetch("APP_NAME")]] }\n))
        control_port = free_port
        control = "tcp://127.0.0.1:#{control_port}"
        with_cli(*process_args, "--control-url", control, "--control-token", "secret", "--drain-delay", "5",
                 "--log-requests", "name.ru", chdir: dir, env: { "APP_NAME" => "app" }) do |port, pid, log|
          wait_until(60) { control_get(control, "/ready")[0] == 200 }
          with_cli("name.ru", chdir: dir, env: { "APP_NAME" => "spare" }) do |spare_port|
            front = free_port
            with_haproxy(<<~HAPROXY) do |haproxy_dir|
              frontend web
                bind 127.0.0.1:#{front}
                default_backend hyperion
              backend hyperion
                option httpchk GET /ready
                timeout check 10s
                server app 127.0.0.1:#{port} check port #{control_port} inter 200ms fall 1 rise 1
                server spare 127.0.0.1:#{spare_port}
            HAPROXY
              wait_until(30) { haproxy_stats(haproxy_dir, "hyperion", "app")["status"] == "UP" }
              served_by_app = -> { File.read(log).scan(/^\{.*"status":200/).size }
              keep_alive = nil
              fresh = under_load(front) do
                keep_alive = under_load(front, keep_alive: true) do
                  # Both loads are reaching "app" before the TERM.
                  before = served_by_app.call
                  wait_until(60) { served_by_app.call >= before + 20 }
                  Process.kill("TERM", pid)
                  wait_until(60) { haproxy_stats(haproxy_dir, "hyperion", "app")["status"].start_with?("DOWN") }
                  # Marked down within the delay: "app" is still there and serving.
                  expect(Process.waitpid(pid, Process::WNOHANG)).to be_nil
                  expect(http_get(port).body).to eq("app")
                  expect(wait_for_exit(pid, 90).exitstatus).to eq(0)
                end
              end
              # Every response counted: all 200s, from the two servers only
              # (which load HAProxy sent where is its round-robin's business).
              [fresh, keep_alive].each do |result|
                expect(result["codes"]).to eq("200" => result["codes"]["200"])
              end
              expect(fresh["bodies"].keys | keep_alive["bodies"].keys).to match_array(%w[app spare])
              app_stats = haproxy_stats(haproxy_dir, "hyperion", "app")
              expect(app_stats.values_at("econ", "eresp", "wretr", "wredis")).to eq(%w[0 0 0 0]), app_stats.inspect
              expect(haproxy_stats(haproxy_dir, "hyperion", "BACKEND")["hrsp_5xx"]).to eq("0")
            end
          end
        end
      end
    end

    it "fails no request while the cluster hot-restarts (USR2) and then replaces its workers (USR1)", timeout: 300 do
      with_cli("-w", "2", "--proxy-protocol", "v2", chdir: dir) do |port, master, log|
        wait_until(60) { File.read(log).include?("all 2 workers serving") }
        haproxy_in_front(port, "send-proxy-v2") do |front, haproxy_dir|
          # One client opens a connection per request, another keeps one open.
          keep_alive = nil
          fresh = under_load(front) do
            keep_alive = under_load(front, keep_alive: true) do
              Process.kill("USR2", master)
              wait_until(90) { File.read(log).scan(/old worker \(pid \d+\) left/).size == 2 }
              Process.kill("USR1", master)
              wait_until(90) { File.read(log).scan(/worker \d+ \(pid \d+\) left/).size == 2 }
            end
          end
          [fresh, keep_alive].each do |result|
            expect(result["codes"]).to eq("200" => result["codes"]["200"])
            expect(result["codes"]["200"]).to be >= 10
            # Every request came through the PROXY header (the socket's peer is `proxy`).
            expect(result["bodies"].keys).to eq(["127.0.0.1 HTTP/1.1 http"])
          end
          stats = haproxy_stats(haproxy_dir, "hyperion", "app")
          expect(stats.values_at("econ", "eresp", "wretr", "wredis")).to eq(%w[0 0 0 0]), stats.inspect
        end
      end
    end
  end
end
