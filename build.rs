//! Two things:
//! - `sqlx::migrate!` embeds the files of `migrations/` but cannot tell cargo about a
//!   file added there, so an incremental build would keep the old list of migrations
//!   (a new migration silently missing from the binary): cargo watches the folder here.
//! - Only for scripts/prepare-sqlx.sh: `TESSERA_PREPARE=sqlite|postgres` leaves the other
//!   backend's store out of the build, so that each online pass of sqlx's query checking
//!   sees one backend's queries (the crate itself does not build in such a pass).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tessera_prepare, values(\"sqlite\", \"postgres\"))");
    println!("cargo::rerun-if-changed=migrations");
    println!("cargo::rerun-if-env-changed=TESSERA_PREPARE");
    if let Ok(backend) = std::env::var("TESSERA_PREPARE") {
        println!("cargo::rustc-cfg=tessera_prepare=\"{backend}\"");
    }
}
