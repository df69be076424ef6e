from bench.discovery.run import main

main()
