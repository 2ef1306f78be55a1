from amqprpc.cli import main

main()
