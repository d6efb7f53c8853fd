//! `kasmina own-store`: hands a `file://` artifact store's folders to the image's non-root
//! user. A hostPath folder the kubelet makes (`DirectoryOrCreate`) belongs to root with mode
//! 0755, so the builder, which runs as that user, could not write its revision there. The build,
//! retention and cleanup Jobs run this first, in an init container that is root with only
//! `CAP_CHOWN`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// A folder that could not be read or handed over.
#[derive(Debug, thiserror::Error)]
#[error("giving {path} to {uid}:{gid}: {source}")]
pub struct Error {
    pub path: PathBuf,
    pub uid: u32,
    pub gid: u32,
    #[source]
    pub source: std::io::Error,
}

/// Gives each existing folder of `paths` to `uid:gid`, not recursively (a store's folders are
/// few; its artifacts can be many, and the builder made those as that user). Missing paths
/// are skipped: the builder makes them. Returns the folders whose owner changed.
pub fn own(paths: &[PathBuf], uid: u32, gid: u32) -> Result<Vec<PathBuf>, Error> {
    let mut changed = vec![];
    for path in paths {
        let fail = |source| Error {
            path: path.clone(),
            uid,
            gid,
            source,
        };
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail(e)),
        };
        // A link could point anywhere on the node: follow none.
        if !meta.is_dir() || (meta.uid() == uid && meta.gid() == gid) {
            continue;
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(fail)?;
        changed.push(path.clone());
    }
    Ok(changed)
}

/// `UID:GID`, as `--owner` takes it.
pub fn parse_owner(text: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| format!("--owner {text:?}: expected UID:GID, e.g. 65532:65532"))?;
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("--owner {text:?}: {s:?} is not a number"))
    };
    Ok((number(uid)?, number(gid)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kasmina-own-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ml")).unwrap();
        dir
    }

    #[test]
    fn folders_already_owned_and_missing_ones_are_left_alone() {
        let dir = scratch("kept");
        let meta = std::fs::metadata(&dir).unwrap();
        let paths = [dir.clone(), dir.join("ml"), dir.join("ml/absent")];
        let changed = own(&paths, meta.uid(), meta.gid()).unwrap();
        assert!(changed.is_empty(), "{changed:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// As root (CI), the folders change hands and the artifacts below them do not; as anyone
    /// else the refusal names the folder.
    #[test]
    fn the_store_folders_go_to_the_image_user() {
        let dir = scratch("given");
        std::fs::write(dir.join("ml/artifact"), b"x").unwrap();
        let root = std::fs::metadata(&dir).unwrap().uid() == 0;
        let paths = [dir.clone(), dir.join("ml")];
        match own(&paths, 65532, 65532) {
            Ok(changed) => {
                assert!(root, "only root can give a folder away");
                assert_eq!(changed, paths);
                for path in &paths {
                    let meta = std::fs::metadata(path).unwrap();
                    assert_eq!((meta.uid(), meta.gid()), (65532, 65532), "{path:?}");
                }
                let artifact = std::fs::metadata(dir.join("ml/artifact")).unwrap();
                assert_eq!(artifact.uid(), 0, "not recursive");
            }
            Err(e) => {
                assert!(!root, "{e}");
                assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_owner_is_uid_colon_gid() {
        assert_eq!(parse_owner("65532:65532"), Ok((65532, 65532)));
        assert!(parse_owner("65532").unwrap_err().contains("UID:GID"));
        assert!(
            parse_owner("a:1")
                .unwrap_err()
                .contains("\"a\" is not a number")
        );
    }
}
