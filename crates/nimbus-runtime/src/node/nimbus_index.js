'use strict';
// The entry of the `nimbus` package (the API is in nimbus.js): its public names, one
// `exports.<name> =` a line. When an ES module imports 'nimbus', Node finds these names by
// scanning this file's text (cjs-module-lexer), so it is kept this short: every name can be
// imported (`import { StateConflict } from 'nimbus'`) as well as the whole object
// (`import nimbus from 'nimbus'`, the same object as `require('nimbus')`), and all are the
// very classes the worker throws.
const api = require('./nimbus.js');

exports.StateError = api.StateError;
exports.StateNotEnabled = api.StateNotEnabled;
exports.StateConflict = api.StateConflict;
exports.StateValueTooLarge = api.StateValueTooLarge;
exports.StateTooManyKeys = api.StateTooManyKeys;
exports.StateKeyTooLong = api.StateKeyTooLong;
exports.StateUnavailable = api.StateUnavailable;
exports.currentRequestId = api.currentRequestId;
