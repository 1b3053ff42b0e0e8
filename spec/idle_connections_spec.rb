# frozen_string_literal: true

require "spec_helper"

# What an idle keep-alive connection costs the server. After 100 ms idle a
# connection is parked (src/connection.rs): hyper's state and buffers are
# freed and only the socket and a small task remain. This checks that from
# the outside, by the server's RSS: it once regressed from 7 KiB per
# connection to 17-18 KiB (each plaintext task as large as a TLS one, and a
# parked connection still holding hyper's read buffer; bench/RESULTS.md).
RSpec.describe "Idle keep-alive connections" do
  # Measured 2.2-3.1 KiB per connection (also with the cores oversubscribed);
  # 7 KiB before the regression, 17.4-23.6 KiB with it.
  def max_rss_kib_per_connection = 6

  def hello_request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"

  # Raises this process's open-file limit (the server inherits it) so that
  # both ends can hold `count` sockets; restores it afterwards.
  def with_fd_limit_for(count)
    soft, hard = Process.getrlimit(:NOFILE)
    wanted = count + 500
    wanted = [wanted, hard].min unless hard == Process::RLIM_INFINITY
    raise "RLIMIT_NOFILE hard limit #{hard} is too low for #{count} connections" if wanted < count + 200

    Process.setrlimit(:NOFILE, [soft, wanted].max, hard)
    yield
  ensure
    Process.setrlimit(:NOFILE, soft, hard)
  end

  def vm_rss_kib(pid)
    Integer(File.read("/proc/#{pid}/status")[/^VmRSS:\s+(\d+) kB/, 1])
  end

  # Reads one whole response (head and content-length body) off `socket`.
  def read_response(socket)
    data = +""
    data << socket.readpartial(4096) until (head_end = data.index("\r\n\r\n"))
    length = Integer(data[/^content-length: (\d+)/i, 1])
    data << socket.readpartial(4096) while data.bytesize < head_end + 4 + length
    data
  end

  # Opens `count` keep-alive connections, 200 at a time, each answered once.
  # A pause after each batch lets it park, so that about as many connections
  # hold hyper's buffers at once in every phase and the allocator's pool for
  # those buffers does not grow in the middle of a measurement.
  def open_answered(port, count)
    count.times.each_slice(200).flat_map do |batch|
      sockets = batch.map { TCPSocket.new("127.0.0.1", port) }
      sockets.each { |socket| socket.write(hello_request) }
      sockets.each { |socket| expect(read_response(socket)).to start_with("HTTP/1.1 200") }
      sleep 0.2
      sockets
    end
  end

  # The growth is taken between 1,000 and 3,000 open connections: the first
  # ones also pay for one-off growth (Ruby's heap, the app threads' arenas,
  # the pool for the buffers of connections not parked yet).
  it "cost the server a few KiB of RSS each once parked, and are still served", timeout: 180 do
    sockets = []
    with_fd_limit_for(3000) do
      with_cli("-t", "2", File.join(ServerHelpers::ROOT, "examples/hello.ru")) do |port, pid|
        open_answered(port, 200).each(&:close)
        sockets = open_answered(port, 1000)
        before = vm_rss_kib(pid)
        sockets += open_answered(port, 2000)
        growth = vm_rss_kib(pid) - before
        per_connection = growth.fdiv(2000)
        expect(per_connection).to be < max_rss_kib_per_connection,
                                  "2000 more idle connections grew the server's RSS by #{growth} KiB " \
                                  "(#{per_connection.round(2)} KiB each)"

        # Parked connections are served again at once.
        [sockets.first, sockets.last].each do |socket|
          socket.write(hello_request)
          expect(read_response(socket)).to start_with("HTTP/1.1 200")
        end
      end
    end
  ensure
    sockets.each(&:close)
  end
end
