# frozen_string_literal: true

module Hyperion
  # Turns signals into names read by an ordinary thread. A trap handler only
  # appends the name and writes a byte to a pipe, so the reader wakes up;
  # all the work (forking, logging, exec) happens outside the handler.
  class SignalQueue
    attr_reader :reader

    def initialize(names)
      @names = names
      @pending = []
      @reader, @writer = IO.pipe
      @previous = names.to_h do |name|
        [name, Signal.trap(name) { push(name) }]
      end
    end

    # Waits up to `timeout` seconds for a signal (or for any of `others` to
    # become readable); returns [signal names, readable others].
    def wait(timeout, others = [])
      ready, = IO.select([@reader, *others], nil, nil, timeout)
      ready ||= []
      @reader.read_nonblock(4096, exception: false) if ready.include?(@reader)
      [take, ready - [@reader]]
    end

    # Queues a name as if a signal had arrived (safe in a trap handler).
    def push(name)
      @pending << name
      @writer.write_nonblock(".", exception: false)
    end

    def take
      names = []
      names << @pending.shift until @pending.empty?
      names
    end

    # Puts the previous handlers back; in a forked child, also drops the pipe.
    def restore
      @previous.each { |name, handler| Signal.trap(name, handler || "DEFAULT") }
      @previous = {}
    end

    def close
      restore
      [@reader, @writer].each { |io| io.close unless io.closed? }
    end
  end
end
