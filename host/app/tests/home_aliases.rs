//! No grant may reach the Keel home by another name: a bind mount of the home (or of one of its
//! ancestors) is the same directory, and is refused as the home is. A real home and real mounts
//! (the test needs `mount --bind`, i.e. root; without it, it says so and checks nothing else).

use std::path::Path;
use std::process::Command;

use keel_app::App;
use keel_sandbox::{FsGrant, FsMode, Grants};

/// `source` bind-mounted on `target` until dropped; `None` where mounting is not permitted.
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> Option<Self> {
        std::fs::create_dir_all(target).unwrap();
        let status = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self(target.to_path_buf()))
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn grant(dir: &Path) -> Grants {
    Grants {
        fs: vec![FsGrant::parse(dir.to_str().unwrap(), FsMode::Read).unwrap()],
        ..Grants::default()
    }
}

#[tokio::test]
async fn a_bind_mount_of_the_home_or_of_an_ancestor_is_refused_as_the_home_is() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("parent/home");
    let app = App::open(&home).await.unwrap();
    let aliases = tempfile::tempdir().unwrap();
    let Some(home_alias) = BindMount::new(&home, &aliases.path().join("home")) else {
        eprintln!("mount --bind is not permitted here: nothing checked");
        return;
    };
    let parent_alias = BindMount::new(&root.path().join("parent"), &aliases.path().join("parent")).unwrap();
    std::fs::create_dir_all(home.join("work")).unwrap();

    for (dir, why) in [
        (home_alias.0.clone(), "the home itself"),
        (home_alias.0.join("cache"), "its cache"),
        (home_alias.0.join("components"), "its components"),
        (parent_alias.0.clone(), "an ancestor"),
    ] {
        let refused = app.check_grants(&grant(&dir));
        assert!(refused.is_err(), "{} ({why}) was granted", dir.display());
    }
    // A directory of the user's inside the home is no more refused by another name than by its own.
    app.check_grants(&grant(&home_alias.0.join("work"))).unwrap();
    app.check_grants(&grant(&home.join("work"))).unwrap();
    drop(parent_alias);
}
