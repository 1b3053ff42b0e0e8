# frozen_string_literal: true

require "hyperion/signal_queue"

module Hyperion
  # A thread beside a running Worker, in the worker's own process. It turns
  # the signals the Worker does not handle itself into actions and, in a
  # cluster, beats the heart the master listens to: a byte down a pipe every
  # `interval` seconds ("b" once the worker serves). A beat is only sent while
  # `Worker#healthy?` says the worker still serves (its I/O runtime runs,
  # it accepts, it has app threads that take queued requests), so a wedged
  # worker falls silent and the master replaces it after worker_timeout.
  # When the master is gone (the parent pid changed) it stops the worker, so
  # nothing is orphaned.
  class WorkerMonitor
    # Queued by #stop after whatever is pending: the thread ends on it.
    FINISH = :finish

    def initialize(signals:, interval:, on_signal:, heartbeat: nil, master_pid: nil)
      @signals = SignalQueue.new(signals)
      @interval = interval
      @on_signal = on_signal
      @heartbeat = heartbeat
      @master_pid = master_pid
    end

    def start(worker)
      @worker = worker
      @thread = Thread.new do
        Thread.current.name = "hyperion-monitor"
        Thread.current.report_on_exception = true
        watch
      end
      self
    end

    # Called from on_worker_boot: the listener is ready.
    def booted!
      beat("b")
    end

    # Hands the monitor thread an event (e.g. "STOP") from a trap handler.
    def notice(name)
      @signals.push(name)
    end

    # Handles what is already queued (a STOP notice must still reach
    # systemd), then ends the thread.
    def stop
      @signals.push(FINISH)
      @thread&.join(5) || @thread&.kill
      @signals.close
    end

    private

    def watch
      loop do
        names, = @signals.wait(@interval)
        names.each do |name|
          return if name == FINISH

          @on_signal.call(name, @worker)
        end
        beat("h") if @worker.healthy?
        next unless @master_pid && Process.ppid != @master_pid

        warn "hyperion: worker #{Process.pid}: the master (pid #{@master_pid}) is gone; stopping"
        @worker.stop
        break
      end
    end

    def beat(byte)
      @heartbeat&.write_nonblock(byte, exception: false)
    rescue IOError, SystemCallError
      nil # the master is restarting or gone; the parent check above decides
    end
  end
end
