/* The HTML book's sidebar (lrn_lib.site): the menu button of narrow screens, and search over
   window.BOOK_SEARCH_INDEX (written by the build into _static/search-index.js), in the browser. */
(function () {
  "use strict";

  var MAX_RESULTS = 12;

  function setUpMenu() {
    var button = document.querySelector(".sidebar-toggle");
    if (!button) { return; }
    function show(open) {
      document.body.classList.toggle("sidebar-open", open);
      button.setAttribute("aria-expanded", String(open));
    }
    button.addEventListener("click", function () { show(!document.body.classList.contains("sidebar-open")); });
    /* A link followed from the folded-out sidebar (a section of this page) uncovers the page. */
    document.getElementById("book-sidebar").addEventListener("click", function (event) {
      if (event.target.closest("a")) { show(false); }
    });
  }

  /* The query's words, lower case. */
  function words(query) {
    return query.toLowerCase().split(/\s+/).filter(function (word) { return word.length > 0; });
  }

  /* The entries holding every word, those with the words in their title first. */
  function search(entries, query) {
    var terms = words(query);
    if (terms.length === 0) { return []; }
    var scored = [];
    entries.forEach(function (entry, position) {
      var title = entry.title.toLowerCase();
      var text = (entry.label + " " + entry.text).toLowerCase();
      var score = 0;
      for (var i = 0; i < terms.length; i++) {
        if (title.indexOf(terms[i]) >= 0) { score += 3; }
        else if (text.indexOf(terms[i]) >= 0) { score += 1; }
        else { return; }
      }
      scored.push({entry: entry, score: score - entry.level * 0.1, position: position});
    });
    scored.sort(function (a, b) { return b.score - a.score || a.position - b.position; });
    return scored.slice(0, MAX_RESULTS).map(function (item) { return item.entry; });
  }

  function textSpan(className, text) {
    var span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    return span;
  }

  function showResults(list, found, query) {
    list.replaceChildren();
    list.hidden = query.trim() === "";
    if (found.length === 0) {
      var none = document.createElement("li");
      none.className = "empty";
      none.textContent = "No section matches.";
      list.appendChild(none);
      return;
    }
    found.forEach(function (entry) {
      var link = document.createElement("a");
      link.href = entry.page + "#" + entry.anchor;
      link.appendChild(textSpan("result-title", entry.title));
      link.appendChild(textSpan("result-page", entry.label));
      if (entry.text) { link.appendChild(textSpan("result-text", entry.text)); }
      var item = document.createElement("li");
      item.appendChild(link);
      list.appendChild(item);
    });
    if (window.MathJax && window.MathJax.typesetPromise) { window.MathJax.typesetPromise([list]); }
  }

  function setUpSearch() {
    var input = document.getElementById("book-search");
    var list = document.getElementById("book-search-results");
    var entries = window.BOOK_SEARCH_INDEX || [];
    if (!input || !list) { return; }
    input.addEventListener("input", function () { showResults(list, search(entries, input.value), input.value); });
    input.addEventListener("keydown", function (event) {
      var first = list.querySelector("a");
      if (event.key === "Enter" && first) { window.location.href = first.href; }
      if (event.key === "Escape") { input.value = ""; showResults(list, [], ""); }
    });
  }

  setUpMenu();
  setUpSearch();
}());
