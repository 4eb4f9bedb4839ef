//! Rows of text in aligned columns under an upper-case header, for people (the CLI's
//! listings, the benchmark's report), or the same rows as a Markdown table.

/// Rows of text printed in aligned columns under an upper-case header.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// Longest cell shown; longer text is cut with `…`.
pub const MAX_CELL_CHARS: usize = 60;

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
    pub fn text(&self) -> String {
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

    /// The table in Markdown: header row, separator, one row per line (`|` escaped).
    pub fn markdown(&self) -> String {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let mut out = line(&self.headers);
        out.push_str(&format!("|{}\n", "---|".repeat(self.headers.len())));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
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
            t.text(),
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
        let text = t.text();
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
    fn markdown_escapes_pipes() {
        let mut t = Table::new(&["server", "p50"]);
        t.row(["a|b", "1.25 ms"]);
        assert_eq!(
            t.markdown(),
            "| SERVER | P50 |\n|---|---|\n| a\\|b | 1.25 ms |\n"
        );
    }
}
