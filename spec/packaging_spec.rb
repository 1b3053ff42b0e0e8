# frozen_string_literal: true

require "spec_helper"

RSpec.describe "packaging" do
  def wait_serving(log, pid)
    wait_for_listening(log, pid)
  end

  def start_and_get(command, env:, chdir:)
    log = File.join(Dir.mktmpdir("hyperion-pkg"), "server.log")
    pid = Process.spawn({ "HYPERION_LOG" => "info" }.merge(env), *command, "-b", "127.0.0.1", "-p", "0", "config.ru",
                        chdir: chdir, %i[out err] => [log, "w"])
    port = wait_serving(log, pid)
    http_get(port).body
  ensure
    if pid
      Process.kill("TERM", pid)
      Process.wait(pid)
    end
  end

  let(:app_dir) do
    dir = Dir.mktmpdir("hyperion-bundled-app")
    File.write(File.join(dir, "config.ru"), "run ->(_) { [200, {}, ['from the app']] }\n")
    dir
  end

  it "runs with `bundle exec hyperion` from an app whose Gemfile names the gem by path", timeout: 120 do
    File.write(File.join(app_dir, "Gemfile"), "source 'https://rubygems.org'\ngem 'hyperion', path: '#{ServerHelpers::ROOT}'\n")
    env = { "BUNDLE_GEMFILE" => File.join(app_dir, "Gemfile"), "BUNDLE_APP_CONFIG" => File.join(app_dir, ".bundle") }
    out, status = Open3.capture2e(env, "bundle", "install", "--local", chdir: app_dir)
    expect(status).to be_success, out
    expect(start_and_get(%w[bundle exec hyperion], env: env, chdir: app_dir)).to eq("from the app")
  end

  # Builds the gem and installs it offline into a private GEM_HOME: cargo runs
  # from extconf.rb, and the installed gem must carry the .so but no target/.
  it "builds with `gem build` and installs offline with `gem install --local`", :gem_install, timeout: 900 do
    work = Dir.mktmpdir("hyperion-gem")
    out, status = Open3.capture2e("gem", "build", File.join(ServerHelpers::ROOT, "hyperion.gemspec"), "-o",
                                  File.join(work, "hyperion.gem"), chdir: ServerHelpers::ROOT)
    expect(status).to be_success, out
    gem_home = File.join(work, "home")
    system_path = `gem env gempath`.strip
    env = { "GEM_HOME" => gem_home, "GEM_PATH" => "#{gem_home}:#{system_path}" }
    out, status = Open3.capture2e(env, "gem", "install", "--local", "--no-document", File.join(work, "hyperion.gem"))
    expect(status).to be_success, out

    installed = Dir[File.join(gem_home, "gems", "hyperion-*")].first
    expect(Dir.glob(File.join(installed, "**", "target"))).to be_empty
    expect(Dir.glob(File.join(gem_home, "**", "hyperion_native.so"))).not_to be_empty
    expect(Dir.glob(File.join(installed, "**", "*")).sum { |f| File.size(f) }).to be < 20 * 1024 * 1024

    expect(start_and_get([File.join(gem_home, "bin", "hyperion")], env: env, chdir: app_dir)).to eq("from the app")
  end
end
