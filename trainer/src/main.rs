fn main() {
    println!("whet train: not yet");
}
