# frozen_string_literal: true

module Hyperion
  # rack.input for requests without a body: an empty, rewindable, binary
  # reader. It holds no state, so one frozen instance serves every request.
  class NullInput
    def gets(*) = nil
    def read(length = nil, buffer = nil)
      buffer&.clear
      length.nil? || length.zero? ? (buffer || String.new(encoding: Encoding::BINARY)) : nil
    end
    def each; end
    def rewind = 0
    def close; end
    def size = 0
    def external_encoding = Encoding::BINARY
  end

  NULL_INPUT = NullInput.new.freeze
end
