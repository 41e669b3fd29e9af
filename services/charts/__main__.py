from libs.common.cli import run_service_main

run_service_main("charts")
