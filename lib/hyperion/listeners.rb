# frozen_string_literal: true

require "json"
require "socket"

module Hyperion
  # The listening sockets of one server, paired by position with its binds.
  #
  # They come from one of three places, first match wins: the previous master
  # image before a hot restart (HYPERION_INHERITED_LISTENERS), systemd socket
  # activation (LISTEN_FDS), or the binds, opened here. The master keeps every
  # socket open for as long as it runs, so a worker that stops or dies never
  # takes queued connections with it.
  #
  # In the :reuseport model every worker slot above 0 gets its own clone of
  # each SO_REUSEPORT socket (same address), so the kernel balances between
  # slots; unix sockets and sockets without SO_REUSEPORT are shared.
  class Listeners
    INHERIT_ENV = "HYPERION_INHERITED_LISTENERS"
    BACKLOG = 1024

    attr_reader :main

    # binds: Array of Bind. Returns Listeners; raises BindError/ConfigError.
    def self.setup(binds, reuseport:, env: ENV)
      inherited = env.delete(INHERIT_ENV)
      if inherited
        from_inheritance(JSON.parse(inherited), binds, reuseport)
      elsif (activated = Systemd.activated_sockets(env))
        new(adopt_paired(activated, binds, reuseport), binds, reuseport: reuseport)
      else
        new(binds.map { |bind| open(bind, reuseport: reuseport) }, binds, reuseport: reuseport, owned: true)
      end
    end

    def self.from_inheritance(state, binds, reuseport)
      sockets = state.fetch("main").map { |fd| for_fd(fd) }
      listeners = new(adopt_paired(sockets, binds, reuseport), binds, reuseport: reuseport,
                                                                       owned: state["owned"])
      state.fetch("slots", {}).each do |index, fds|
        listeners.adopt_slot(Integer(index), fds.map { |fd| fd && for_fd(fd) })
      end
      listeners
    rescue KeyError, JSON::ParserError, TypeError, ArgumentError => e
      raise ConfigError, "#{INHERIT_ENV} is malformed (#{e.message}); unset it to bind afresh"
    end

    # Pairs adopted sockets with binds by position (a bind's ssl:// settings
    # apply to its socket); binds beyond the adopted sockets are opened, and
    # adopted sockets beyond the binds are served as plain HTTP.
    def self.adopt_paired(sockets, binds, reuseport)
      sockets + binds.drop(sockets.size).map { |bind| open(bind, reuseport: reuseport) }
    end

    def self.for_fd(fd)
      socket = Socket.for_fd(Integer(fd))
      socket.close_on_exec = true # the next exec passes it on explicitly
      socket.local_address # raises if it is not a socket
      socket
    rescue SystemCallError => e
      raise ConfigError, "inherited fd #{fd} is not a listening socket (#{e.message})"
    end

    def self.open(bind, reuseport:)
      bind.scheme == :unix ? open_unix(bind) : open_tcp(bind, reuseport)
    rescue Errno::EADDRINUSE
      raise BindError, "could not bind #{bind}: address already in use"
    rescue Errno::EACCES
      raise BindError, "could not bind #{bind}: permission denied" \
                       "#{' (ports below 1024 need root)' unless bind.scheme == :unix}"
    rescue Errno::EADDRNOTAVAIL, Errno::ENOENT, SocketError => e
      raise BindError, "could not bind #{bind}: #{e.message}"
    end

    def self.open_tcp(bind, reuseport)
      addresses = Addrinfo.getaddrinfo(bind.host, bind.port, nil, :STREAM)
      error = nil
      addresses.each do |address|
        return listen_on(address, reuseport: reuseport)
      rescue SystemCallError => e
        error = e
      end
      raise error || SocketError.new("#{bind.host} resolved to no address")
    end

    def self.listen_on(address, reuseport:)
      socket = Socket.new(address.afamily, :STREAM)
      socket.setsockopt(:SOCKET, :REUSEADDR, true)
      socket.setsockopt(:SOCKET, :REUSEPORT, true) if reuseport
      socket.bind(address)
      socket.listen(BACKLOG)
      socket
    rescue SystemCallError
      socket&.close
      raise
    end

    def self.open_unix(bind)
      old_umask = File.umask(bind.umask) if bind.umask
      UNIXServer.new(bind.path).tap { |server| server.listen(BACKLOG) }
    ensure
      File.umask(old_umask) if old_umask
    end

    def initialize(main, binds, reuseport:, owned: false)
      @main = main
      @binds = binds
      @reuseport = reuseport
      @owned = owned # true when we created the unix socket files
      @clones = {} # slot index => Array (nil where the main socket is shared)
    end

    # The sockets worker `index` serves, one per bind.
    def slot(index)
      return @main if index.zero? || !@reuseport

      @clones[index] ||= @main.map { |socket| clone_socket(socket) }
      @main.each_index.map { |i| @clones[index][i] || @main[i] }
    end

    def adopt_slot(index, sockets)
      if @reuseport && sockets.size == @main.size
        @clones[index] = sockets
      else
        sockets.compact.each(&:close)
      end
    end

    # Slots that have sockets of their own.
    def slot_indices = @clones.keys

    # Closes a retired slot's clones (their queued connections are lost; see
    # docs/signals.md on TTOU).
    def close_slot(index)
      @clones.delete(index)&.compact&.each(&:close)
    end

    # In a forked worker: drop the other slots' clones, so closing one in the
    # master really takes it out of the kernel's balancing.
    def keep_only(index)
      @clones.each { |i, sockets| sockets.compact.each(&:close) unless i == index }
    end

    # Env and fd redirects that hand every socket to the next master image.
    def inheritance
      fds = { "main" => @main.map(&:fileno), "owned" => @owned,
              "slots" => @clones.transform_values { |sockets| sockets.map { |s| s&.fileno } } }
      redirects = (@main + @clones.values.flatten.compact).to_h { |s| [s.fileno, s.fileno] }
      [{ INHERIT_ENV => JSON.generate(fds) }, redirects]
    end

    def tls_at(index) = @binds[index]&.tls

    def urls
      @main.each_with_index.map do |socket, i|
        address = socket.local_address
        next "unix://#{address.unix_path}" if address.unix?

        host = address.ip_address.include?(":") ? "[#{address.ip_address}]" : address.ip_address
        host = @binds[i].url_host if %w[0.0.0.0 [::]].include?(host) && @binds[i]&.host
        "#{@binds[i]&.tls ? 'https' : 'http'}://#{host}:#{address.ip_port}"
      end
    end

    def close
      (@main + @clones.values.flatten.compact).each { |socket| socket.close unless socket.closed? }
      return unless @owned

      @binds.each { |bind| File.delete(bind.path) if bind.scheme == :unix && File.socket?(bind.path) }
    end

    private

    def clone_socket(socket)
      address = socket.local_address
      return nil unless address.ip? && socket.getsockopt(:SOCKET, :REUSEPORT).bool

      self.class.listen_on(address, reuseport: true)
    end
  end
end
