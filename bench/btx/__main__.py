from bench.btx.run import main

main()
