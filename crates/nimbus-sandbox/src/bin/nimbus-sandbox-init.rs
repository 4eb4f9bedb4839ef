//! The sandbox init (see `nimbus_sandbox::init`) as a standalone program, for tests.

fn main() {
    nimbus_sandbox::init::main()
}
