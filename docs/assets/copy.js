// The copy button of a console-style block (`>>> ` / `... ` prompts, as in the API pages'
// examples) copies only the code: prompts and printed outputs are left out. Other blocks are
// copied as they are, by Material's own handler.
(function () {
  "use strict";

  // The code of a block whose prompts Pygments marked (class "gp"), without prompts or output.
  function fnllmCodeText(code) {
    if (!code.querySelector(".gp")) return null;
    var lines = [];
    var current = null;
    code.childNodes.forEach(function walk(node) {
      var text = node.textContent;
      var isPrompt = node.nodeType === 1 && node.classList.contains("gp");
      var isOutput = node.nodeType === 1 && node.classList.contains("go");
      if (isPrompt) {
        current = "";
        lines.push(current);
        return;
      }
      if (isOutput || current === null) return;
      var parts = text.split("\n");
      lines[lines.length - 1] += parts[0];
      if (parts.length > 1) current = null; // the line ended: what follows needs a prompt
    });
    return lines.join("\n") + "\n";
  }
  window.fnllmCodeText = fnllmCodeText;

  function fallbackCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  document.addEventListener(
    "click",
    function (event) {
      var button = event.target.closest && event.target.closest(".md-clipboard");
      if (!button) return;
      var block = button.closest("pre") || button.parentElement;
      var code = block && block.querySelector("code");
      var text = code && fnllmCodeText(code);
      if (text === null || text === undefined) return;
      event.stopImmediatePropagation();
      event.preventDefault();
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).catch(function () { fallbackCopy(text); });
      } else {
        fallbackCopy(text);
      }
    },
    true
  );
})();
