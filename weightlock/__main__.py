from weightlock.console import main

main()
