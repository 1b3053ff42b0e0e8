# frozen_string_literal: true

require "spec_helper"

# `rails server -u hyperion` on an app that Debian's Rails 6.1 generates, all
# offline: `rails new` without bundle install, JavaScript or webpacker, then
# `bundle install --local` against the system gems with this checkout as the
# hyperion gem (by path). The request is answered by a Rails controller
# through Rack::Handler::Hyperion.
RSpec.describe "rails server -u hyperion", timeout: 240 do
  # What the app does not need and could not install offline.
  let(:skips) do
    %w[--minimal --skip-bundle --skip-webpack-install --skip-javascript --skip-git --skip-active-record
       --skip-puma --skip-bootsnap --skip-keeps --skip-test --skip-sprockets --skip-listen --no-rc]
  end

  it "serves a generated Rails app and stops on INT" do
    root = Dir.mktmpdir("hyperion-rails")
    app = File.join(root, "app")
    env = { "HOME" => root, "BUNDLE_GEMFILE" => File.join(app, "Gemfile"),
            "BUNDLE_APP_CONFIG" => File.join(app, ".bundle"), "HYPERION_LOG" => "info" }
    out, status = Open3.capture2e(env, "rails", "new", app, *skips, chdir: root)
    expect(status).to be_success, out

    # byebug is a development tool Debian does not install with Rails.
    gemfile = File.read(env["BUNDLE_GEMFILE"]).gsub(/^.*byebug.*\n/, "")
    File.write(env["BUNDLE_GEMFILE"], "#{gemfile}gem 'hyperion', path: #{ServerHelpers::ROOT.inspect}\n")
    out, status = Open3.capture2e(env, "bundle", "install", "--local", chdir: app)
    expect(status).to be_success, out
    File.write(File.join(app, "config/routes.rb"), <<~RUBY)
      Rails.application.routes.draw { get "/hello", to: "hello#show" }
    RUBY
    File.write(File.join(app, "app/controllers/hello_controller.rb"), <<~RUBY)
      class HelloController < ActionController::Base
        def show
          render plain: "Rails \#{Rails.version} on \#{request.env['SERVER_SOFTWARE']} for \#{request.remote_ip}"
        end
      end
    RUBY

    log = File.join(root, "server.log")
    pid = Process.spawn(env, "bundle", "exec", "rails", "server", "-u", "hyperion", "-b", "127.0.0.1", "-p", "0",
                        chdir: app, %i[out err] => [log, "w"])
    port = nil
    wait_until(120) do
      raise "rails server exited:\n#{File.read(log)}" if Process.waitpid(pid, Process::WNOHANG).tap { |done| pid = nil if done }

      port = File.read(log)[%r{worker listening .*url=http://127\.0\.0\.1:(\d+)}, 1]
    end
    response = http_get(Integer(port), "/hello")
    expect(response.code).to eq("200"), File.read(log)
    expect(response.body).to match(/\ARails 6\.1\.[\d.]+ on hyperion #{Regexp.escape(Hyperion::VERSION)} for 127\.0\.0\.1\z/)
    expect(File.read(log)).to include("=> Booting Hyperion")
    expect(File.read(File.join(app, "log/development.log"))).to include("Processing by HelloController#show")

    Process.kill("INT", pid)
    _, status = Timeout.timeout(30) { Process.wait2(pid) }
    pid = nil
    expect(status).to be_success, File.read(log)
  ensure
    if pid
      Process.kill("KILL", pid)
      Process.wait(pid)
    end
  end
end
