# frozen_string_literal: true

# Watching server processes from the outside, through /proc.
module ProcessHelpers
  # Live (non-zombie) child pids of `pid`.
  def children(pid)
    Dir["/proc/[0-9]*/stat"].filter_map do |stat|
      fields = File.read(stat).split(") ").last.split
      Integer(stat[%r{/proc/(\d+)/}, 1]) if Integer(fields[1]) == pid && fields[0] != "Z"
    rescue Errno::ENOENT, Errno::ESRCH
      nil
    end
  end

  def wait_until(seconds = 20)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
    until yield
      raise "condition not met within #{seconds} s" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.05
    end
  end
end
