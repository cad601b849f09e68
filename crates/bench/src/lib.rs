//! Load generators for `majordome bench`.

pub mod devices;
pub mod events;
pub mod reqrep;
pub mod state;
pub mod titanic;

/// The folder a bench keeps its database in: `data` if given, else a new
/// temporary one (removed when the returned guard is dropped).
pub(crate) fn data_folder(
    data: Option<&std::path::PathBuf>,
    prefix: &str,
) -> anyhow::Result<(Option<tempfile::TempDir>, std::path::PathBuf)> {
    use anyhow::Context;
    Ok(match data {
        Some(path) => (None, path.clone()),
        None => {
            let folder = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .context("cannot create a temporary folder")?;
            let path = folder.path().to_owned();
            (Some(folder), path)
        }
    })
}
