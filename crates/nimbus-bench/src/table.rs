//! The report's model: text and tables ([`Doc`]), rendered as aligned text for people or as
//! Markdown for docs/BENCHMARKS.md, so the two reports cannot say different things.

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
}

impl Table {
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

/// A part of the report: text as it reads, or a table.
#[derive(Debug, Clone)]
enum Block {
    Text(String),
    Table(Table),
}

/// The report: text and tables in order.
#[derive(Debug, Clone, Default)]
pub struct Doc {
    blocks: Vec<Block>,
}

impl Doc {
    /// An empty report.
    pub fn new() -> Self {
        Doc::default()
    }

    /// Appends text (its lines end with `\n`).
    pub fn text(&mut self, text: impl Into<String>) {
        self.blocks.push(Block::Text(text.into()));
    }

    /// Appends a table.
    pub fn table(&mut self, table: Table) {
        self.blocks.push(Block::Table(table));
    }

    /// For people: tables as aligned columns.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            match block {
                Block::Text(text) => out.push_str(text),
                Block::Table(table) => out.push_str(&table.text()),
            }
        }
        out
    }

    /// In Markdown: tables as Markdown tables, each set off by blank lines.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            match block {
                Block::Text(text) => out.push_str(text),
                Block::Table(table) => {
                    if !out.is_empty() && !out.ends_with("\n\n") {
                        out.push('\n');
                    }
                    out.push_str(&table.markdown());
                    out.push('\n');
                }
            }
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
    fn one_doc_reads_as_text_and_as_markdown() {
        let mut table = Table::new(&["server", "p50"]);
        table.row(["isolated", "212 µs"]);
        table.row(["a|b", "1.25 ms"]);
        let mut doc = Doc::new();
        doc.text("Warm latency:\n");
        doc.table(table);
        doc.text("  first error: none\n");
        assert_eq!(
            doc.to_text(),
            "Warm latency:\nSERVER    P50\nisolated  212 µs\na|b       1.25 ms\n  first error: none\n"
        );
        assert_eq!(
            doc.to_markdown(),
            "Warm latency:\n\n| SERVER | P50 |\n|---|---|\n| isolated | 212 µs |\n\
             | a\\|b | 1.25 ms |\n\n  first error: none\n"
        );
    }
}
