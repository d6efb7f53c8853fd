//! Where the weights come from: a URI (`file://`, `s3://`, `gs://`, `az://`, `https://`, or a
//! plain path) resolved to local files, and the memory-mapped safetensors read by rows.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use half::{bf16, f16};
use safetensors::Dtype;

use super::Error;

/// Files of a model on local disk.
pub struct ModelFiles {
    /// The folder holding them.
    pub dir: PathBuf,
    pub config: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// One file, or the shards of an index.
    pub safetensors: Vec<PathBuf>,
    /// The default model name: the source folder's (or file's) name.
    pub name_hint: String,
    /// A download folder removed when this is dropped.
    _download: Option<TempDir>,
}

/// A folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self, Error> {
        let path =
            std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process-unique number for temporary names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos) ^ (NEXT.fetch_add(1, Ordering::Relaxed) << 32)
}

/// Resolves `uri` to local files, downloading remote sources into a temporary folder.
pub async fn fetch(uri: &str) -> Result<ModelFiles, Error> {
    if let Some(path) = uri.strip_prefix("file://") {
        return locate(Path::new(path), None);
    }
    if !uri.contains("://") {
        return locate(Path::new(uri), None);
    }
    let folder = TempDir::new("kasmina-source")?;
    download(uri, &folder.0, &|name: &str| {
        name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
            || name == "config.json"
            || name == "tokenizer.json"
    })
    .await?;
    let name = uri
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("model")
        .to_owned();
    let mut files = locate(&folder.0.clone(), Some(folder))?;
    files.name_hint = name.trim_end_matches(".safetensors").to_owned();
    Ok(files)
}

/// The object store behind `url` and the path in it. Credentials and endpoints come from the
/// environment (AWS_*, GOOGLE_*, AZURE_*), as the build, runtime and retention pods get them
/// from the artifact store's Secret.
pub fn open_store(
    url: &url::Url,
) -> object_store::Result<(Box<dyn object_store::ObjectStore>, object_store::path::Path)> {
    let options = std::env::vars().map(|(k, v)| (k.to_ascii_lowercase(), v));
    object_store::parse_url_opts(url, options)
}

/// Downloads the objects at `uri` (a single `.safetensors` object, or the files under a
/// prefix whose names `wanted` accepts) into the folder `into`.
pub async fn download(
    uri: &str,
    into: &Path,
    wanted: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(), Error> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let url = url::Url::parse(uri).map_err(|e| Error::Source(format!("{uri}: {e}")))?;
    if !matches!(url.scheme(), "s3" | "gs" | "az" | "https") {
        return Err(Error::Source(format!(
            "{uri}: unsupported scheme {:?}; use a path, file://, s3://, gs://, az:// or https://",
            url.scheme()
        )));
    }
    let (store, prefix) = open_store(&url).map_err(|e| Error::Source(format!("{uri}: {e}")))?;
    let unreachable = |e: object_store::Error| Error::Source(format!("{uri}: {e}"));
    // A single file, or a folder listing.
    let objects: Vec<object_store::path::Path> = if uri.ends_with(".safetensors") {
        vec![prefix.clone()]
    } else {
        store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .try_collect::<Vec<_>>()
            .await
            .map_err(unreachable)?
            .into_iter()
            .filter(|p| p.filename().is_some_and(wanted))
            .collect()
    };
    if objects.is_empty() {
        return Err(Error::Source(format!(
            "{uri}: none of the expected files (model or artifact) is there"
        )));
    }
    for object in objects {
        let name = object.filename().unwrap_or("model.safetensors").to_owned();
        let bytes = store
            .get(&object)
            .await
            .map_err(unreachable)?
            .bytes()
            .await
            .map_err(unreachable)?;
        let path = into.join(&name);
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Finds the model files in a folder, or takes a single `.safetensors` file.
pub fn locate(path: &Path, download: Option<TempDir>) -> Result<ModelFiles, Error> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::Source(format!("{}: {e}", path.display())))?;
    let stem = |p: &Path| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_owned()
    };
    if meta.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let config = Some(dir.join("config.json")).filter(|p| p.is_file());
        return Ok(ModelFiles {
            config,
            tokenizer: None,
            safetensors: vec![path.to_path_buf()],
            name_hint: stem(path),
            dir,
            _download: download,
        });
    }
    let index = path.join("model.safetensors.index.json");
    let safetensors = if index.is_file() {
        shards(&index)?
    } else if path.join("model.safetensors").is_file() {
        vec![path.join("model.safetensors")]
    } else {
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        if found.is_empty() {
            // A hostPath source missing on the node is mounted as an empty folder.
            let what = if std::fs::read_dir(path).is_ok_and(|mut e| e.next().is_none()) {
                "an empty folder: the model is not found there"
            } else {
                "no .safetensors file"
            };
            return Err(Error::Source(format!("{}: {what}", path.display())));
        }
        found
    };
    let name_hint = path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    Ok(ModelFiles {
        config: Some(path.join("config.json")).filter(|p| p.is_file()),
        tokenizer: Some(path.join("tokenizer.json")).filter(|p| p.is_file()),
        safetensors,
        name_hint,
        dir: path.to_path_buf(),
        _download: download,
    })
}

/// The shard files named by a sharded checkpoint's index.
fn shards(index: &Path) -> Result<Vec<PathBuf>, Error> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text)
        .map_err(|e| Error::Source(format!("{}: {e}", index.display())))?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::Source(format!(
            "{}: shard {} is missing",
            index.display(),
            missing.display()
        )));
    }
    Ok(paths)
}

/// The source tensors, memory-mapped, read row by row under their GGUF names.
pub struct SourceTensors {
    mmap: MmapedSafetensors,
    /// GGUF name → source name.
    names: HashMap<String, String>,
}

/// A tensor as the source file declares it.
#[derive(Clone, Debug)]
pub struct Declared {
    pub source_name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

impl SourceTensors {
    /// Maps the files; fails clearly on a truncated or corrupt file.
    pub fn open(files: &[PathBuf]) -> Result<(Self, Vec<Declared>), Error> {
        // SAFETY: the mapped files are not modified while the builder runs; candle requires
        // `unsafe` because another process could.
        let mmap = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
            Error::Source(format!(
                "{}: not a valid safetensors file ({e})",
                names.join(", ")
            ))
        })?;
        let mut declared: Vec<Declared> = mmap
            .tensors()
            .into_iter()
            .map(|(name, view)| Declared {
                source_name: name,
                shape: view.shape().to_vec(),
                dtype: view.dtype(),
            })
            .collect();
        declared.sort_by(|a, b| a.source_name.cmp(&b.source_name));
        Ok((
            Self {
                mmap,
                names: HashMap::new(),
            },
            declared,
        ))
    }

    /// Registers the GGUF name of a source tensor.
    pub fn alias(&mut self, gguf_name: &str, source_name: &str) {
        self.names.insert(gguf_name.into(), source_name.into());
    }

    /// Rows `rows` of a 2-D (or 1-D: one row) tensor as F32.
    /// F32 rows on a little-endian machine are borrowed from the map, not copied.
    pub fn rows_f32(&self, gguf_name: &str, rows: Range<usize>) -> Result<Cow<'_, [f32]>, Error> {
        let source_name = self
            .names
            .get(gguf_name)
            .map(String::as_str)
            .unwrap_or(gguf_name);
        let view = self
            .mmap
            .get(source_name)
            .map_err(|e| Error::Source(format!("{source_name}: {e}")))?;
        let shape = view.shape();
        // The last dimension is the row, as in `TensorInfo::rows`.
        let row_len: usize = shape.last().copied().unwrap_or(1);
        let size = match view.dtype() {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(Error::UnsupportedDtype(
                    source_name.into(),
                    format!("{other:?}"),
                ));
            }
        };
        let bytes = view
            .data()
            .get(rows.start * row_len * size..rows.end * row_len * size)
            .ok_or_else(|| {
                Error::Source(format!(
                    "{source_name}: rows {rows:?} are outside the tensor"
                ))
            })?;
        if view.dtype() == Dtype::F32 && cfg!(target_endian = "little") {
            // SAFETY: every bit pattern is a valid f32; `align_to` only yields the aligned
            // middle, which is the whole slice when the data starts on a 4-byte boundary.
            let (head, floats, tail) = unsafe { bytes.align_to::<f32>() };
            if head.is_empty() && tail.is_empty() {
                return Ok(Cow::Borrowed(floats));
            }
        }
        Ok(Cow::Owned(match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }))
    }
}
