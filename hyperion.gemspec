# frozen_string_literal: true

require_relative "lib/hyperion/version"

Gem::Specification.new do |spec|
  spec.name = "hyperion"
  spec.version = Hyperion::VERSION
  spec.summary = "A Rack HTTP server with a Rust core (tokio + hyper)"
  spec.description = "Hyperion serves Rack 2 and Rack 3 apps. Sockets, HTTP parsing and request bodies are " \
                     "handled in Rust; the app runs on Ruby threads under the GVL."
  spec.authors = ["The Hyperion team"]
  spec.license = "MIT"
  spec.homepage = "https://example.invalid/hyperion"
  spec.required_ruby_version = ">= 3.0"

  # Only what building and running needs: no cargo target/, no specs.
  spec.files = Dir[
    "lib/**/*.rb", "src/**/*.rs", "ext/hyperion/*.rb", "bin/hyperion", "bin/hyperionctl",
    "Cargo.toml", "Cargo.lock", "README.md", "docs/**/*.md", "LICENSE"
  ]
  spec.bindir = "bin"
  spec.executables = ["hyperion", "hyperionctl"]
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/hyperion/extconf.rb"]

  spec.add_dependency "rack", ">= 2.2", "< 4"
end
