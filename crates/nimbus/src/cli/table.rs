//! A small aligned-column table printer for the client's human-readable output.

use nimbus_client::{File, PageInfo};

use super::dash;

/// Rows of text printed in aligned columns under an upper-case header.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// Longest cell shown; longer text is cut with `…`.
const MAX_CELL_CHARS: usize = 60;

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut cells: Vec<String> = cells.into_iter().map(|c| clean(&c.into())).collect();
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text: columns separated by two spaces, no trailing spaces, one line per row.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                line.push_str(&" ".repeat(width - cell.chars().count()));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

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

/// One line of at most [`MAX_CELL_CHARS`] characters: control characters become spaces.
fn clean(cell: &str) -> String {
    let flat: String = cell
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > MAX_CELL_CHARS {
        let mut cut: String = flat.chars().take(MAX_CELL_CHARS - 1).collect();
        cut.push('…');
        cut
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_without_trailing_spaces() {
        let mut t = Table::new(&["name", "version", "status"]);
        t.row(["hello", "1", "active"]);
        t.row(["a-much-longer-name", "12", ""]);
        assert_eq!(
            t.render(),
            "NAME                VERSION  STATUS\n\
             hello               1        active\n\
             a-much-longer-name  12\n"
        );
    }

    #[test]
    fn cells_are_one_line_and_bounded() {
        let mut t = Table::new(&["x", "y"]);
        t.row(["line1\nline2"]);
        t.row(["é".repeat(100), "z".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "line1 line2");
        assert!(
            lines[2].starts_with(&format!("{}…  z", "é".repeat(MAX_CELL_CHARS - 1))),
            "{text}"
        );
        assert!(Table::new(&["a"]).is_empty());
    }

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
