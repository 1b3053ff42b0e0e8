# frozen_string_literal: true

require "hyperion/control"

module Hyperion
  # The cluster master's control listener: a Ruby thread that accepts on the
  # control socket and answers one request per connection. The master runs
  # no tokio runtime (it forks; see Cluster), and it has no app threads for
  # this thread to wait behind, so a plain Ruby server is enough here. Heads
  # are decided by `Control.parse_head` (httparse and the same token rules as
  # a worker's listener); the responder (Cluster) supplies the answers.
  class ControlServer
    MAX_HEAD_BYTES = 8192
    HEAD_TIMEOUT = 10
    MAX_CONNECTIONS = 16
    REASONS = { 200 => "OK", 400 => "Bad Request", 403 => "Forbidden", 404 => "Not Found",
                405 => "Method Not Allowed", 408 => "Request Timeout", 500 => "Internal Server Error",
                503 => "Service Unavailable" }.freeze

    # settings: Control::Settings (opened). responder: ->(name) { [status,
    # content_type, body, after] }.
    def initialize(settings, responder:, log:)
      @settings = settings
      @responder = responder
      @log = log
      @clients = {} # the connections being answered
      @lock = Mutex.new
    end

    def start
      @thread = Thread.new do
        Thread.current.name = "hyperion-control"
        Thread.current.report_on_exception = false
        accept_loop
      end
      self
    end

    # In the master at exit; `@thread` ends when the socket closes.
    def stop
      @settings.close
      @thread&.join(2) || @thread&.kill
    end

    # In a forked worker: drop the inherited socket and connections (their
    # threads did not survive the fork).
    def close_in_child
      @settings.socket.close unless @settings.socket.closed?
      @clients.each_key { |client| client.close unless client.closed? }
    end

    private

    def accept_loop
      loop do
        client = @settings.socket.accept
        client = client.first if client.is_a?(Array) # Socket#accept: [socket, address]
        if @lock.synchronize { @clients.size < MAX_CONNECTIONS && (@clients[client] = true) }
          Thread.new(client) { |c| serve(c) }
        else
          client.close
        end
      end
    rescue IOError, SystemCallError
      nil # the socket was closed: the master is stopping
    end

    def serve(client)
      head = read_head(client)
      return respond(client, 408, "text/plain", "Request Timeout", false) unless head

      decided = Control.parse_head(head, @settings.auth_token)
      status, type, body, after = case decided
                                  when String then @responder.call(decided)
                                  when Array then [decided[0], "text/plain", decided[1], nil]
                                  else [400, "text/plain", "Bad request", nil]
                                  end
      respond(client, status, type, body, head.start_with?("HEAD "))
      finish(client)
      after&.call
    rescue StandardError => e
      @log.call("control request failed: #{e.class}: #{e.message}")
    ensure
      finish(client)
      @lock.synchronize { @clients.delete(client) }
    end

    # Ends the connection for the client too: a worker forked while it was
    # open holds a copy of the descriptor, so closing ours alone would not
    # send the FIN a client reading to the end (pumactl) waits for.
    def finish(client)
      return if client.closed?

      client.shutdown(Socket::SHUT_RDWR)
    rescue SystemCallError, IOError
      nil
    ensure
      client.close unless client.closed?
    end

    # The request head, or nil when it does not arrive whole in time.
    def read_head(client)
      head = +""
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + HEAD_TIMEOUT
      until head.include?("\r\n\r\n") || head.include?("\n\n")
        return nil if head.bytesize > MAX_HEAD_BYTES

        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        return nil if left <= 0 || !client.wait_readable(left)

        chunk = client.read_nonblock(4096, exception: false)
        return nil if chunk.nil?

        head << chunk unless chunk == :wait_readable
      end
      head
    end

    def respond(client, status, type, body, head_only)
      body = body.to_s.b
      client.write("HTTP/1.1 #{status} #{REASONS.fetch(status, 'Unknown')}\r\ncontent-type: #{type}\r\n" \
                   "content-length: #{body.bytesize}\r\nconnection: close\r\n\r\n#{body unless head_only}")
    rescue SystemCallError, IOError
      nil
    end
  end
end
