from crecli.cli import main

main()
