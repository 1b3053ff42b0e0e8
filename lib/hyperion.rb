# frozen_string_literal: true

require "socket"
require "stringio"
require "hyperion/version"
require "hyperion/errors"
require "hyperion/null_input"
require "hyperion/config"
require "hyperion/stats"

begin
  require "hyperion/hyperion_native"
rescue LoadError => e
  raise LoadError, "hyperion's native extension is not built (#{e.message}); run `bin/setup` or `rake compile`", cause: nil
end

require "hyperion/control"
