fn main() {
    std::process::exit(fieldbridge::cli::main());
}
