# frozen_string_literal: true

require "openssl"
require "tmpdir"

# A throwaway PKI for the TLS specs: root CA → intermediate → server leaf
# (localhost, 127.0.0.1), a client CA with one client certificate, and an
# expired leaf. Files are PEM in a temporary directory.
class TestPKI
  attr_reader :dir

  def initialize
    @dir = Dir.mktmpdir("hyperion-pki")
    @serial = 0
    root_key, root = issue("Hyperion Test Root", ca: true)
    inter_key, inter = issue("Hyperion Test Intermediate", ca: true, issuer: [root_key, root])
    leaf_key, leaf = issue("localhost", issuer: [inter_key, inter], san: "DNS:localhost,IP:127.0.0.1")
    write("root.pem", root)
    write("chain.pem", leaf, inter)
    write("server.key", leaf_key)
    other_key = OpenSSL::PKey::EC.generate("prime256v1")
    write("other.key", other_key)
    expired_key, expired = issue("localhost", issuer: [inter_key, inter], not_after: Time.now - 3600)
    write("expired.pem", expired, inter)
    write("expired.key", expired_key)
    client_ca_key, client_ca = issue("Hyperion Client CA", ca: true)
    client_key, client = issue("client-1", issuer: [client_ca_key, client_ca])
    write("client_ca.pem", client_ca)
    write("client.pem", client)
    write("client.key", client_key)
    @client_cert = client
  end

  def path(name) = File.join(@dir, name)

  def client_cert_pem = @client_cert.to_pem

  private

  def issue(name, ca: false, issuer: nil, san: nil, not_after: Time.now + 86_400)
    key = OpenSSL::PKey::EC.generate("prime256v1")
    cert = OpenSSL::X509::Certificate.new
    cert.version = 2
    cert.serial = (@serial += 1)
    cert.subject = OpenSSL::X509::Name.parse("/CN=#{name}")
    issuer_key, issuer_cert = issuer || [key, cert]
    cert.issuer = issuer ? issuer_cert.subject : cert.subject
    cert.public_key = key
    cert.not_before = not_after - (2 * 86_400)
    cert.not_after = not_after
    ext = OpenSSL::X509::ExtensionFactory.new(issuer_cert, cert)
    cert.add_extension(ext.create_extension("basicConstraints", ca ? "CA:TRUE" : "CA:FALSE", true))
    cert.add_extension(ext.create_extension("keyUsage", ca ? "keyCertSign,cRLSign" : "digitalSignature", true))
    cert.add_extension(ext.create_extension("subjectAltName", san)) if san
    cert.add_extension(ext.create_extension("extendedKeyUsage", "serverAuth,clientAuth")) unless ca
    cert.sign(issuer_key, OpenSSL::Digest.new("SHA256"))
    [key, cert]
  end

  def write(name, *objects)
    File.write(path(name), objects.map(&:to_pem).join)
  end
end
