;;;; An SBCL image with a Swank listener, run as a stasis service: the classic way of running
;;;; Lisp as a Linux service, with stasis taking the place of save-lisp-and-die. Whatever the
;;;; image holds (here *notes*, filled through Swank) survives stop -> start in a checkpoint.
;;;;
;;;; Environment: SWANK_PORT (default 4005), SLIME_DIR (where Debian's cl-swank put Swank),
;;;; XDG_CACHE_HOME (a directory the service user can write: Swank compiles itself into it on
;;;; the first start; service users often have no writable home).

(defun env (name default)
  (or (sb-ext:posix-getenv name) default))

(defvar *slime-dir* (env "SLIME_DIR" "/usr/share/common-lisp/source/slime/"))
(load (merge-pathnames "swank-loader.lisp" *slime-dir*))
(swank-loader:init :load-contribs nil)

(defvar *notes* (make-hash-table :test 'equal)
  "The image's state: lives only in memory.")
(defvar *started-at* (get-universal-time)
  "When this image was cold-started; a restored image keeps the old value.")

(let ((port (parse-integer (env "SWANK_PORT" "4005"))))
  ;; :spawn: one thread per connection; the main thread only keeps the image alive.
  (swank:create-server :port port :dont-close t :style :spawn)
  (format t "swank: listening on 127.0.0.1:~D~%" port)
  (finish-output))

(loop (sleep 3600))
