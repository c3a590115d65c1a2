from tether.coordinator.cli.main import console

console()
