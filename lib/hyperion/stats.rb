# frozen_string_literal: true

require "json"

module Hyperion
  # Puma's `Puma.stats` (a JSON String) and `Puma.stats_hash`, so code that
  # reads Puma's stats reads ours: in a single process the running worker's
  # (`backlog`, `running`, `pool_capacity`, `max_threads`,
  # `requests_count`, `busy_threads`, `started_at`), in a cluster's master
  # the cluster's (`workers`, `booted_workers`, `old_workers`, `phase`,
  # `worker_status`), in a cluster's worker that worker's own. The runner
  # sets `stats_object`; anything with a `stats` method returning a Hash will do.
  class << self
    attr_writer :stats_object

    def stats_hash
      raise Hyperion::Error, "Hyperion.stats: no server is running in this process" unless @stats_object

      @stats_object.stats
    end

    def stats
      JSON.generate(stats_hash)
    end
  end
end
