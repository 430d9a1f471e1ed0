//! `sqlx::migrate!` embeds `migrations/` at compile time; without this, adding a migration file
//! would not rebuild the crate (the sqlx documentation's recommended build script).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
