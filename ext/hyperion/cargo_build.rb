# frozen_string_literal: true

# Builds the Rust crate with cargo and copies the shared object to where
# `require "hyperion/hyperion_native"` finds it. Used by extconf.rb's Makefile
# (gem install) and by `rake compile`; there is no rb_sys gem on Debian, so
# this drives cargo itself.
#
#   ruby cargo_build.rb CRATE_DIR OUTPUT_SO [TARGET_DIR]
#
# Without TARGET_DIR a temporary one is used and removed afterwards, so an
# installed gem carries no cargo target/ tree.
require "fileutils"
require "rbconfig"
require "tmpdir"

module HyperionCargoBuild
  module_function

  def run(crate_dir, output, target_dir = nil)
    cargo = ENV.fetch("CARGO", "cargo")
    unless system(cargo, "--version", out: File::NULL, err: File::NULL)
      abort "hyperion: cargo not found; install Rust (https://rustup.rs) to build the native extension"
    end
    temporary = target_dir.nil?
    target_dir ||= Dir.mktmpdir("hyperion-cargo")
    # rb-sys' build script asks this Ruby for its headers and config.
    env = { "RUBY" => RbConfig.ruby, "CARGO_TARGET_DIR" => target_dir }
    command = [cargo, "build", "--release", "--lib", "--features", "ruby",
               "--manifest-path", File.join(crate_dir, "Cargo.toml")]
    system(env, *command) or abort "hyperion: `#{command.join(' ')}` failed"
    built = File.join(target_dir, "release", "libhyperion_native.so")
    FileUtils.mkdir_p(File.dirname(output))
    # Copy to a temp name and rename: a running process keeps the old inode.
    FileUtils.cp(built, "#{output}.tmp")
    File.rename("#{output}.tmp", output)
  ensure
    FileUtils.rm_rf(target_dir) if temporary && target_dir
  end
end

HyperionCargoBuild.run(*ARGV) if $PROGRAM_NAME == __FILE__
