// Typeset the maths pymdownx.arithmatex (generic mode) leaves in .arithmatex elements.
// Runs on every page load and on Material's instant navigation (document$).
function renderMaths(root) {
  renderMathInElement(root, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: true,
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(({ body }) => renderMaths(body));
} else {
  document.addEventListener("DOMContentLoaded", () => renderMaths(document.body));
}
