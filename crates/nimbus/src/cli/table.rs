//! The CLI's human-readable output: tables (from nimbus-table), aligned details, files and
//! page notes.

use nimbus_client::{File, PageInfo};

use super::dash;

pub use nimbus_table::Table;

/// `key: value` lines with the values aligned, for one resource's details.
pub fn details<K: AsRef<str>>(pairs: &[(K, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.as_ref().chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let key = key.as_ref();
        out.push_str(key);
        out.push(':');
        out.push_str(&" ".repeat(width - key.chars().count() + 1));
        out.push_str(value);
        out.push('\n');
    }
    out
}

/// `handler.py (39 B), lib/util.py (120 B)`: the files of a function or version.
pub fn files_text(files: &[File]) -> String {
    files
        .iter()
        .map(|file| format!("{} ({} B)", dash(&file.path), file.size))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `showing 21–40 of 57` when a page of which `shown` items are printed leaves some out;
/// `None` when everything is shown.
pub fn page_note(page: &PageInfo, shown: usize) -> Option<String> {
    let offset = u64::from(page.offset);
    let total = page.total;
    let shown = shown as u64;
    (shown > 0 && shown < total)
        .then(|| format!("showing {}–{} of {total}", offset + 1, offset + shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_notes_appear_only_for_partial_pages() {
        let page = PageInfo {
            total: 57,
            offset: 20,
            limit: 20,
        };
        assert_eq!(page_note(&page, 20).as_deref(), Some("showing 21–40 of 57"));
        let all = PageInfo {
            total: 3,
            offset: 0,
            limit: 20,
        };
        assert_eq!(page_note(&all, 3), None);
        assert_eq!(page_note(&page, 0), None);
    }

    #[test]
    fn details_align_values() {
        let text = details(&[
            ("name", "hello".to_owned()),
            ("runtime", "python3.11".to_owned()),
        ]);
        assert_eq!(text, "name:    hello\nruntime: python3.11\n");
    }
}
