# frozen_string_literal: true

require "ipaddr"

# PROXY protocol headers as a load balancer writes them (HAProxy's
# proxy-protocol.txt), for specs that play the proxy themselves.
module ProxyHeaders
  V2_SIGNATURE = "\r\n\r\n\0\r\nQUIT\n".b

  def proxy_v1(client, server = "127.0.0.1", client_port = 40_000, server_port = 80)
    family = IPAddr.new(client).ipv6? ? "TCP6" : "TCP4"
    "PROXY #{family} #{client} #{server} #{client_port} #{server_port}\r\n"
  end

  # `local: true` is the proxy's own connection (a health check): no client.
  # `tlv` adds one type-length-value field, which the server must skip.
  def proxy_v2(client, server = "127.0.0.1", client_port = 40_000, server_port = 80, local: false, tlv: nil)
    ipv6 = IPAddr.new(client).ipv6?
    addresses = IPAddr.new(client).hton + IPAddr.new(server).hton + [client_port, server_port].pack("n2")
    addresses += [tlv[0], tlv[1].bytesize].pack("Cn") + tlv[1].b if tlv
    command = local ? 0x20 : 0x21
    family = ipv6 ? 0x21 : 0x11 # AF_INET6 or AF_INET, over STREAM
    V2_SIGNATURE + [command, family, addresses.bytesize].pack("CCn") + addresses
  end
end
