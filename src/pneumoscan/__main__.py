from pneumoscan.cli import console_main

console_main()
