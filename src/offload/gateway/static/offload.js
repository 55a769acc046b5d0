/*! offload.js: wait for background tasks and follow channels from the browser. No dependencies.
 *
 *   const value = await offload.result(taskId, {token, onProgress: (task) => ..., base});
 *   const sub = offload.subscribe("news", (data) => ..., {token, base, onError});  sub.close();
 *
 * Server-Sent Events first; long polling when EventSource is missing or its stream fails.
 * `base` is where the gateway is mounted; by default, where this script was loaded from.
 */
(function (global) {
  "use strict";

  var FINAL = { succeeded: true, failed: true, expired: true, cancelled: true };
  var POLL_WAIT_S = 25;
  // A stream that has sent nothing by then is likely held by a buffering proxy: poll instead.
  var SSE_GRACE_MS = 10000;

  var script = global.document && global.document.currentScript;
  var defaultBase = script && script.src ? script.src.replace(/offload\.js(?:[?#].*)?$/, "") : "";

  function baseOf(options) {
    var base = options.base != null ? String(options.base) : defaultBase;
    return base && base.charAt(base.length - 1) !== "/" ? base + "/" : base;
  }

  function query(params) {
    var parts = [];
    for (var key in params) {
      if (params[key] != null && params[key] !== "") {
        parts.push(encodeURIComponent(key) + "=" + encodeURIComponent(params[key]));
      }
    }
    return parts.length ? "?" + parts.join("&") : "";
  }

  function hasEventSource(options) {
    return !options.poll && typeof global.EventSource !== "undefined";
  }

  // XMLHttpRequest rather than fetch: it exists wherever EventSource may not.
  function getJSON(url, onDone) {
    var xhr = new XMLHttpRequest();
    xhr.open("GET", url);
    xhr.timeout = (POLL_WAIT_S + 20) * 1000;
    xhr.setRequestHeader("Accept", "application/json");
    xhr.onload = function () {
      var data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { /* not JSON: a proxy's error page */ }
      var etag = xhr.getResponseHeader("ETag");
      onDone(xhr.status, data, etag ? etag.replace(/^W\//, "").replace(/"/g, "") : null);
    };
    xhr.onerror = xhr.ontimeout = function () { onDone(0, null, null); };
    xhr.send();
    return xhr;
  }

  function retryDelay(failures) {
    return Math.min(1000 * Math.pow(2, failures - 1), 15000);
  }

  function httpError(status, data) {
    var error = new Error((data && data.detail) || "HTTP " + status);
    error.status = status;
    error.error = { type: "HTTPError", message: error.message };
    return error;
  }

  function taskError(task) {
    var err = task.error || { type: "TaskError", message: "task " + task.status };
    var error = new Error(err.message || err.type);
    error.status = task.status;
    error.error = err;
    error.task = task;
    return error;
  }

  function later(fn) {
    // A throwing callback must not break our loop; it still reaches window.onerror.
    return function (value) {
      try { fn(value); } catch (e) { setTimeout(function () { throw e; }); }
    };
  }

  /** Resolve with the task's result; reject with an Error carrying .status and .error. */
  function result(taskId, options) {
    options = options || {};
    var base = baseOf(options);
    var path = base + "tasks/" + encodeURIComponent(taskId);
    var onProgress = options.onProgress ? later(options.onProgress) : function () {};
    var shown = null;
    var failures = 0;

    return new Promise(function (resolve, reject) {
      function report(task) {
        var key = task.status + "|" + task.progress + "|" + task.message;
        if (key !== shown) {
          shown = key;
          onProgress(task);
        }
      }

      function settle(task) {
        report(task);
        if (task.status === "succeeded") resolve(task.result);
        else reject(taskError(task));
      }

      // The first request answers at once; the next ones wait until the state differs from
      // the version we have (its ETag) or the task ends.
      function poll(version) {
        var params = { token: options.token };
        if (version) { params.wait = POLL_WAIT_S; params.since = version; }
        getJSON(path + query(params), function (status, task, etag) {
          if (status === 200 && task) {
            failures = 0;
            if (FINAL[task.status]) return settle(task);
            report(task);
            // No ETag (stripped by a proxy): wait for the end only; progress then shows less.
            return etag ? poll(etag) : pollEnd();
          }
          if (status === 0 || status >= 500 || !task) {
            failures += 1;
            return setTimeout(function () { poll(version); }, retryDelay(failures));
          }
          reject(httpError(status, task));
        });
      }

      function pollEnd() {
        getJSON(path + query({ token: options.token, wait: POLL_WAIT_S }), function (status, task) {
          if (status === 200 && task) {
            failures = 0;
            if (FINAL[task.status]) return settle(task);
            report(task);
            return pollEnd();
          }
          if (status === 0 || status >= 500 || !task) {
            failures += 1;
            return setTimeout(pollEnd, retryDelay(failures));
          }
          reject(httpError(status, task));
        });
      }

      function stream() {
        var source = new global.EventSource(path + "/events" + query({ token: options.token }));
        var heard = false;
        var over = false;
        var timer = setTimeout(function () { if (!heard) fallBack(); }, SSE_GRACE_MS);

        function fallBack() {
          if (over) return;
          over = true;
          clearTimeout(timer);
          source.close();
          poll(null);
        }

        source.addEventListener("state", function (event) {
          heard = true;
          clearTimeout(timer);
          report(JSON.parse(event.data));
        });
        source.addEventListener("done", function (event) {
          over = true;
          clearTimeout(timer);
          source.close();
          settle(JSON.parse(event.data));
        });
        source.onerror = function () {
          // CLOSED: the server refused the stream (403, 404, an error page); polling finds out
          // why. CONNECTING after events came: EventSource reconnects by itself and resumes
          // with Last-Event-ID. CONNECTING before any event: the stream does not work here.
          if (source.readyState === 2 || !heard) fallBack();
        };
      }

      if (hasEventSource(options)) stream();
      else poll(null);
    });
  }

  /** Call onMessage(data) for every message published on the channel; returns {close()}. */
  function subscribe(channel, onMessage, options) {
    options = options || {};
    var path = baseOf(options) + "channels/" + encodeURIComponent(channel);
    var deliver = later(onMessage);
    var closed = false;
    var source = null;
    var request = null;
    var timer = null;
    var cursor = null;
    var failures = 0;

    function fail(status, data) {
      closed = true;
      if (options.onError) later(options.onError)(httpError(status, data));
    }

    function poll() {
      if (closed) return;
      request = getJSON(path + query({ token: options.token, cursor: cursor, wait: POLL_WAIT_S }), function (status, data) {
        request = null;
        if (closed) return;
        if (status === 200 && data) {
          failures = 0;
          cursor = data.cursor;
          for (var i = 0; i < data.messages.length; i++) deliver(data.messages[i]);
          return poll();
        }
        if (status === 0 || status >= 500 || !data) {
          failures += 1;
          timer = setTimeout(poll, retryDelay(failures));
          return;
        }
        fail(status, data);
      });
    }

    function stream() {
      var opened = false;
      source = new global.EventSource(path + "/events" + query({ token: options.token }));
      timer = setTimeout(function () { if (!opened) fallBack(); }, SSE_GRACE_MS);

      function fallBack() {
        clearTimeout(timer);
        if (source) source.close();
        source = null;
        poll();
      }

      source.onopen = function () { opened = true; clearTimeout(timer); };
      source.onmessage = function (event) { deliver(JSON.parse(event.data)); };
      source.onerror = function () {
        if (source && (source.readyState === 2 || !opened)) fallBack();
      };
    }

    if (hasEventSource(options)) stream();
    else poll();

    return {
      close: function () {
        closed = true;
        clearTimeout(timer);
        if (source) source.close();
        if (request) request.abort();
      }
    };
  }

  global.offload = { result: result, subscribe: subscribe };
})(typeof window !== "undefined" ? window : this);
