# bin/serve examples/hello.ru  — then: curl http://127.0.0.1:9292/
run ->(env) { [200, { "content-type" => "text/plain" }, ["Hello from Hyperion\n"]] }
