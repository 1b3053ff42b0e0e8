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
