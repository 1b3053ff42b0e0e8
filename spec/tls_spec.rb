# frozen_string_literal: true

require "spec_helper"

RSpec.describe "TLS (rustls)" do
  let(:pki) { TestPKI.new }

  let(:app) do
    lambda do |env|
      [200, { "content-type" => "text/plain" },
       [env.values_at("rack.url_scheme", "HTTPS", "SERVER_PORT").join(" "), "|", env["SSL_CLIENT_CERT"].to_s]]
    end
  end

  def tls_files(**extra)
    { cert: pki.path("chain.pem"), key: pki.path("server.key") }.merge(extra)
  end

  def https_get(port, cert: nil, key: nil)
    http = Net::HTTP.new("127.0.0.1", port)
    http.use_ssl = true
    http.ca_file = pki.path("root.pem")
    http.verify_mode = OpenSSL::SSL::VERIFY_PEER
    http.read_timeout = 5
    if cert
      http.cert = OpenSSL::X509::Certificate.new(File.read(pki.path(cert)))
      http.key = OpenSSL::PKey.read(File.read(pki.path(key)))
    end
    http.start { |h| h.get("/") }
  end

  it "serves https with the whole chain, verified by a client that trusts only the root" do
    with_worker(app, tls: tls_files) do |port|
      response = https_get(port)
      expect(response.body).to eq("https on #{port}|")
      out, status = Open3.capture2e("openssl", "s_client", "-connect", "127.0.0.1:#{port}", "-showcerts",
                                    stdin_data: "")
      expect(status).to be_success
      expect(out.scan("-----BEGIN CERTIFICATE-----").size).to eq(2), out
    end
  end

  it "speaks TLS 1.2 and 1.3 only, and offers http/1.1 over ALPN" do
    with_worker(app, tls: tls_files) do |port|
      %w[-tls1_2 -tls1_3].each do |version|
        out, status = Open3.capture2e("openssl", "s_client", "-connect", "127.0.0.1:#{port}", version,
                                      "-alpn", "http/1.1", stdin_data: "")
        expect(status).to be_success, out
        expect(out).to include("ALPN protocol: http/1.1")
      end
      out, status = Open3.capture2e("openssl", "s_client", "-connect", "127.0.0.1:#{port}", "-tls1_1",
                                    stdin_data: "")
      expect(status).not_to be_success, out
      expect(https_get(port).code).to eq("200")
    end
  end

  it "works with curl over HTTP/1.1" do
    with_worker(app, tls: tls_files) do |port|
      out, status = Open3.capture2("curl", "-s", "--http1.1", "--cacert", pki.path("root.pem"),
                                   "-w", "\n%{http_version}", "https://localhost:#{port}/",
                                   "--resolve", "localhost:#{port}:127.0.0.1")
      expect(status).to be_success
      expect(out).to eq("https on #{port}|\n1.1")
    end
  end

  it "generates a development certificate with self_signed: true" do
    with_worker(app, tls: { self_signed: true }) do |port|
      out, status = Open3.capture2("curl", "-sk", "https://127.0.0.1:#{port}/")
      expect([status.success?, out]).to eq([true, "https on #{port}|"])
    end
  end

  describe "client certificates" do
    it "force_peer: refuses a client without a certificate and hands a verified one to the app" do
      tls = tls_files(ca: pki.path("client_ca.pem"), verify_mode: :force_peer)
      with_worker(app, tls: tls) do |port|
        expect { https_get(port) }.to raise_error(OpenSSL::SSL::SSLError, /alert|certificate/)
        response = https_get(port, cert: "client.pem", key: "client.key")
        expect(response.body).to eq("https on #{port}|#{pki.client_cert_pem}")
        expect { https_get(port, cert: "chain.pem", key: "server.key") }
          .to raise_error(OpenSSL::SSL::SSLError) # signed by a CA the server does not trust
      end
    end

    it "peer: lets a client without a certificate in" do
      tls = tls_files(ca: pki.path("client_ca.pem"), verify_mode: :peer)
      with_worker(app, tls: tls) do |port|
        expect(https_get(port).body).to eq("https on #{port}|")
        expect(https_get(port, cert: "client.pem", key: "client.key").body).to end_with(pki.client_cert_pem)
      end
    end
  end

  describe "files that cannot work stop boot with one line" do
    {
      "a missing certificate" => [{ cert: "/nonexistent/cert.pem" }, /cannot read the TLS certificate/],
      "a key that does not fit the certificate" => [{ key: :other }, /TLS key does not fit the certificate/],
      "an expired certificate" => [{ cert: :expired, key: :expired_key }, /expired on/],
      "a certificate file that is not PEM" => [{ cert: :server_key_as_cert }, /holds no PEM certificate/]
    }.each do |problem, (overrides, message)|
      it "for #{problem}" do
        paths = { other: pki.path("other.key"), expired: pki.path("expired.pem"),
                  expired_key: pki.path("expired.key"), server_key_as_cert: pki.path("server.key") }
        tls = tls_files(**overrides.transform_values { |v| paths.fetch(v, v) })
        worker = Hyperion::Worker.new(host: "127.0.0.1", port: 0, app: app, read_timeout: 5, tls: tls)
        expect { worker.run }.to raise_error(Hyperion::TLSError) { |e|
          expect(e.message).to match(message)
          expect(e.message).not_to include("\n")
        }
      end
    end

    it "from the CLI as well" do
      out, err, status = Open3.capture3(RbConfig.ruby, ServerHelpers::HYPERION, "-b", "127.0.0.1", "-p", "0",
                                        "--tls-cert", pki.path("chain.pem"), "--tls-key", pki.path("other.key"),
                                        File.join(ServerHelpers::ROOT, "examples/hello.ru"))
      expect(status.exitstatus).to eq(1)
      expect(err).to match(/\Ahyperion: the TLS key does not fit the certificate .*\n\z/)
      expect(out).to be_empty
      _out, err, status = Open3.capture3(RbConfig.ruby, ServerHelpers::HYPERION, "--tls-key", "k.pem", "x.ru")
      expect([status.exitstatus, err]).to eq([1, "hyperion: --tls-key given without --tls-cert\n"])
    end
  end

  it "survives plaintext HTTP, garbage and a stalled handshake without disturbing other connections" do
    with_worker(app, tls: tls_files, read_timeout: 0.5) do |port|
      stalled = TCPSocket.new("127.0.0.1", port) # never sends a ClientHello
      plaintext = raw_exchange(port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait: 2)
      expect(plaintext).not_to include("200 OK")
      expect(https_get(port).code).to eq("200")
      expect(read_all(stalled, 3)).to eq("") # closed by the handshake timeout
      expect(https_get(port).code).to eq("200")
    end
  end

  describe "read_timeout after the handshake" do
    def tls_connect(port)
      context = OpenSSL::SSL::SSLContext.new
      context.verify_mode = OpenSSL::SSL::VERIFY_NONE
      ssl = OpenSSL::SSL::SSLSocket.new(TCPSocket.new("127.0.0.1", port), context)
      ssl.sync_close = true
      ssl.connect
      ssl
    end

    # Decrypted bytes until the server closes (or `wait` seconds pass).
    def tls_read_all(ssl, wait)
      out = +""
      deadline = Time.now + wait
      loop do
        chunk = ssl.read_nonblock(65_536, exception: false)
        break if chunk.nil?

        if chunk == :wait_readable
          remaining = deadline - Time.now
          break if remaining <= 0 || !ssl.to_io.wait_readable(remaining)
        else
          out << chunk
        end
      end
      out
    rescue OpenSSL::SSL::SSLError, Errno::ECONNRESET
      out # closed without close_notify
    end

    it "answers 408 through TLS to a connection that sends no request, and to a stalled head" do
      with_worker(app, tls: { self_signed: true }, read_timeout: 0.5) do |port|
        silent = tls_connect(port)
        stalled = tls_connect(port)
        stalled.write("GET /stall HT")
        [silent, stalled].each do |ssl|
          expect(tls_read_all(ssl, 10)).to start_with("HTTP/1.1 408").and include("connection: close")
        end
      ensure
        silent&.close
        stalled&.close
      end
    end
  end

  it "prints an https listening line from the CLI with --tls-self-signed" do
    with_cli("--tls-self-signed", File.join(ServerHelpers::ROOT, "examples/hello.ru")) do |port, _pid, log|
      expect(File.read(log)).to include("listening on https://127.0.0.1:#{port}", "self-signed development certificate")
      out, = Open3.capture2("curl", "-sk", "https://127.0.0.1:#{port}/")
      expect(out).to eq("Hello from Hyperion\n")
    end
  end
end
