# frozen_string_literal: true

# Rack apps the specs serve.
module TestApps
  module_function

  # Answers with the env as JSON: strings as they are, other values as
  # "#<Class>" (plus a few facts about rack.input).
  def env_dump
    lambda do |env|
      input = env["rack.input"]
      body = input.read
      input.rewind
      dump = env.to_h do |key, value|
        [key, value.is_a?(String) || value == true || value == false || value.is_a?(Array) ? value : "#<#{value.class}>"]
      end
      dump["body"] = body
      dump["body_encoding"] = body.encoding.name
      dump["input_rewound_read"] = input.read
      dump["frozen_env"] = env.frozen?
      [200, { "content-type" => "application/json" }, [JSON.generate(dump)]]
    end
  end

  # A body whose #close calls are counted into `counter` (an Array).
  class CountingBody
    def initialize(chunks, counter, raise_in_each: false)
      @chunks = chunks
      @counter = counter
      @raise_in_each = raise_in_each
    end

    def each(&block)
      @chunks.each(&block)
      raise "boom in each" if @raise_in_each
    end

    def close
      @counter << :closed
    end
  end
end
