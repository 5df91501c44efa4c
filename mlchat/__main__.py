from mlchat.cli import main

main()
