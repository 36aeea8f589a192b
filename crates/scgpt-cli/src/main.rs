fn main() {
    eprintln!("scgpt: the embed and export commands are not built yet (model issue)");
    std::process::exit(2);
}
