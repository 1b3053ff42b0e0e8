# frozen_string_literal: true

# `gem install` runs this, then `make` and `make install`. mkmf's C rules do
# not apply to a Rust crate, so this writes a small Makefile that calls
# cargo_build.rb and installs the shared object under sitearchdir/hyperion/
# (RubyGems points sitearchdir at the gem's extension directory).
require "rbconfig"

crate_dir = File.expand_path("../..", __dir__)
builder = File.expand_path("cargo_build.rb", __dir__)
sitearchdir = RbConfig::CONFIG["sitearchdir"]

File.write("Makefile", <<~MAKEFILE)
  RUBY = #{RbConfig.ruby}
  sitearchdir = #{sitearchdir}

  all: hyperion_native.so

  hyperion_native.so:
  \t$(RUBY) "#{builder}" "#{crate_dir}" "$(CURDIR)/hyperion_native.so"

  install: hyperion_native.so
  \tmkdir -p "$(DESTDIR)$(sitearchdir)/hyperion"
  \tmv hyperion_native.so "$(DESTDIR)$(sitearchdir)/hyperion/hyperion_native.so"

  clean:
  \trm -f hyperion_native.so

  .PHONY: all install clean
MAKEFILE
